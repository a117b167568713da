"""The gateway's hot state: what every request reads or changes, behind one interface.

:mod:`.base` names it (:class:`~.base.HotState`); :mod:`.local` keeps it in the
process (the embedded default, ``mitmdump -s addons/datorus.py``); a shared
implementation for ``datorus serve --workers N`` keeps the same state in Redis.
"""
