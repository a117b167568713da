"""Checkers: staged health checks of egress, found as plugins like the parsers.

- :mod:`.base` the ``Checker`` protocol, ``CheckContext`` and ``CheckOutcome``;
- :mod:`.registry` checkers found through the ``datorus.checkers`` entry-point group
  (the shipped ones too), ordered by stage, then priority;
- :mod:`.pipeline` one check of one egress: every checker, stage by stage;
- :mod:`.tcp` the shipped ``tcp_connect`` (stage 1);
- :mod:`.judge_check` the shipped ``http_anonymity`` (stage 2): a GET of the judge
  through the egress, grading anonymity (:mod:`.anonymity`) and finding the exit's
  country (:mod:`.geo`).

No database and no mitmproxy: the pool worker schedules the checks and stores what
they find (``datorus_core.checking``); what a result does to an egress's status is
``datorus_core.egress_status``.
"""
