"""``ConsumerSerial``: the jobs run one file at a time, in the order files arrived."""

from __future__ import annotations

from dpypeline.legacy.event_consumer.core import EventConsumer


class ConsumerSerial(EventConsumer):
    pass


__all__ = ["ConsumerSerial"]
