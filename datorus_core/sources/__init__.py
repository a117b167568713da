"""Proxy-list sources, the pure part: what a list holds, how it is read, when to fetch it.

- :mod:`.found` the typed, validated proxy a list names (``FoundProxy``);
- :mod:`.parsers` the ``Parser`` protocol and the shipped ``plaintext``, ``json`` and
  ``csv`` parsers;
- :mod:`.registry` parsers found as plugins through the ``datorus.parsers`` entry-point
  group (the shipped ones too), ``pick_parser`` and ``parse_list``;
- :mod:`.schedule` standard five-field cron expressions: ``validate_cron``, ``next_run``.

No network, no database: the caller fetches the list and stores what it finds.
"""
