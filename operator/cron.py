"""Next fire time of a cron expression (the 5-field syntax CronJobs accept), for `status.nextSchedule`."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
NAMES = {
    3: {m: i + 1 for i, m in enumerate(MONTHS)},
    4: {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}


def _value(text: str, index: int) -> int:
    names = NAMES.get(index, {})
    return names[text.lower()] if text.lower() in names else int(text)


def _field(text: str, index: int) -> tuple[set[int], bool]:
    """The values one field allows, and whether it was restricted (not `*`)."""
    low, high = RANGES[index]
    allowed: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if body in ("*", "?"):
            start, end = low, high
        elif "-" in body:
            first, last = body.split("-", 1)
            start, end = _value(first, index), _value(last, index)
        else:
            start = _value(body, index)
            end = high if step_text else start
        if start < low or end > high + (1 if index == 4 else 0) or step < 1:
            raise ValueError(f"cron field {text!r} out of range {low}-{high}")
        allowed.update(range(start, end + 1, step))
    if index == 4 and 7 in allowed:
        allowed = (allowed - {7}) | {0}
    return allowed, text not in ("*", "?")


def next_fire(expression: str, after: datetime, time_zone: str | None = None) -> datetime:
    """The first minute strictly after `after` that matches; DOM and DOW are OR-ed when both are set."""
    fields = MACROS.get(expression.strip(), expression).split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expression!r} must have 5 fields")
    (minutes, _), (hours, _), (days, dom_set), (months, _), (weekdays, dow_set) = (
        _field(f, i) for i, f in enumerate(fields)
    )
    zone = ZoneInfo(time_zone) if time_zone else after.tzinfo
    moment = after.astimezone(zone).replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(600_000):
        day_ok = (
            (moment.day in days or moment.isoweekday() % 7 in weekdays)
            if dom_set and dow_set
            else (moment.day in days and moment.isoweekday() % 7 in weekdays)
        )
        if moment.month not in months or not day_ok:
            moment = (moment + timedelta(days=1)).replace(hour=0, minute=0)
        elif moment.hour not in hours:
            moment = (moment + timedelta(hours=1)).replace(minute=0)
        elif moment.minute not in minutes:
            moment += timedelta(minutes=1)
        else:
            return moment.astimezone(after.tzinfo)
    raise ValueError(f"cron expression {expression!r} never fires")
