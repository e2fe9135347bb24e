"""rosbag2 files in and out, with the ``rosbags`` library (pure Python, no ROS install).

Messages are kept as CDR bytes, exactly what travels on the wire, so a replay
publishes a bag's bytes unchanged (rclpy publishes raw bytes) and what the node
publishes is written back byte for byte. The typestore knows the standard ROS 2
Kilted types and this package's own messages (read from their ``.msg`` files).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import NextChatError

PACKAGE = "nextchat_ros"
OWN_MESSAGES = ("GroundedObject", "GroundingResult", "Query", "QueryTruth")
STORAGES = ("mcap", "sqlite3")


class BagError(NextChatError):
    """A bag that cannot be written or read as asked (the message says why)."""


def msg_dir() -> Path:
    """Where this package's ``.msg`` files are: the source tree (quick start) or the
    ROS workspace's share directory (colcon install)."""
    source = Path(__file__).resolve().parents[2] / "msg"
    if (source / "QueryTruth.msg").is_file():
        return source
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE)) / "msg"
    except Exception as exc:  # any lookup failure means the same thing here
        raise BagError(f"cannot find the {PACKAGE} message definitions ({exc})") from None


@lru_cache(maxsize=1)
def typestore():
    """A rosbags typestore with ROS 2 Kilted's types plus ``nextchat_ros/msg/*``."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    directory = msg_dir()
    for name in OWN_MESSAGES:
        types.update(get_types_from_msg((directory / f"{name}.msg").read_text(), f"{PACKAGE}/msg/{name}"))
    store.register(types)
    return store


def serialize(msg, msgtype: str) -> bytes:
    return bytes(typestore().serialize_cdr(msg, msgtype))


def deserialize(data: bytes, msgtype: str):
    return typestore().deserialize_cdr(data, msgtype)


def msg_class(msgtype: str):
    try:
        return typestore().types[msgtype]
    except KeyError:
        raise BagError(f"unknown message type '{msgtype}'") from None


class BagWriter:
    """A rosbag2 being written: ``add(topic, msgtype)`` once per topic, then
    ``write(topic, time_ns, cdr_bytes)``. A context manager (closing writes the
    metadata; an unclosed mcap bag is what a crash leaves behind)."""

    def __init__(self, path: str | Path, storage: str = "mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise BagError(f"unknown bag storage '{storage}'; use one of {STORAGES}")
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"{self.path} already exists; choose a new output path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self._writer.open()
        self._connections = {}
        self.count = 0

    def add(self, topic: str, msgtype: str) -> None:
        if topic not in self._connections:
            msg_class(msgtype)  # a clear error for an unknown type
            self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=typestore())

    def write(self, topic: str, time_ns: int, data: bytes) -> None:
        self._writer.write(self._connections[topic], int(time_ns), data)
        self.count += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class BagMessage:
    topic: str
    msgtype: str
    time_ns: int  # the bag's log time
    data: bytes  # CDR


@dataclass
class BagInfo:
    topics: dict[str, str]  # topic -> msgtype
    counts: dict[str, int]
    storage: str
    damaged: str = ""  # why the bag could not be opened normally (it is then read as far as it goes)

    def topics_of(self, msgtype: str) -> list[str]:
        return sorted(t for t, m in self.topics.items() if m == msgtype)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise BagError(f"no bag at {path}")
    if not path.is_dir():
        raise BagError(f"{path} is a file; a rosbag2 bag is the directory that holds metadata.yaml and the "
                       "storage files")
    if not (path / "metadata.yaml").is_file() and not any(path.glob("*.mcap")):
        raise BagError(f"{path} is not a rosbag2 directory (no metadata.yaml, no .mcap file)")


def _open_reader(path: Path):
    """A rosbags Reader, or (None, why) when the bag cannot be opened normally."""
    from rosbags.rosbag2 import Reader

    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # rosbags raises several types for damaged bags
        return None, _describe(exc)
    return reader, ""


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _stream_mcap(path: Path, topics: list[str] | None, why: str) -> Iterator[BagMessage]:
    """Read .mcap files front to back without their summary (what a crash or a cut
    copy leaves), with the mcap package's streaming reader."""
    from mcap.records import Channel, Message, Schema
    from mcap.stream_reader import StreamReader

    files = sorted(path.glob("*.mcap"))
    if not files:
        raise BagError(f"cannot open the bag {path}: {why}")
    schemas: dict[int, str] = {}
    channels: dict[int, tuple[str, str]] = {}
    for file in files:
        with open(file, "rb") as stream:
            try:
                for record in StreamReader(stream).records:
                    if isinstance(record, Schema):
                        schemas[record.id] = record.name
                    elif isinstance(record, Channel):
                        channels[record.id] = (record.topic, schemas.get(record.schema_id, ""))
                    elif isinstance(record, Message):
                        topic, msgtype = channels.get(record.channel_id, ("", ""))
                        if topic and (topics is None or topic in topics):
                            yield BagMessage(topic, msgtype, record.log_time, bytes(record.data))
            except Exception as exc:  # truncated records, bad lengths, bad magic...
                raise BagError(f"the bag {path} is damaged: {file.name} breaks off ({_describe(exc)}) after "
                               f"the messages read so far; it could not be opened normally ({why})") from None


def bag_info(path: str | Path) -> BagInfo:
    """Topics, types and message counts. A damaged mcap bag is scanned as far as it
    reads (``damaged`` says why); one that cannot be read at all is an error."""
    path = Path(path)
    _check_path(path)
    reader, why = _open_reader(path)
    if reader is not None:
        try:
            topics = {c.topic: c.msgtype for c in reader.connections}
            counts: dict[str, int] = {}
            for c in reader.connections:
                counts[c.topic] = counts.get(c.topic, 0) + c.msgcount
            storage = "mcap" if any(path.glob("*.mcap")) else "sqlite3"
            return BagInfo(topics, counts, storage)
        finally:
            reader.close()
    topics, counts = {}, {}
    try:
        for message in _stream_mcap(path, None, why):
            topics[message.topic] = message.msgtype
            counts[message.topic] = counts.get(message.topic, 0) + 1
    except BagError as exc:
        if not topics:
            raise BagError(f"cannot read the bag {path}: {exc}") from None
    return BagInfo(topics, counts, "mcap", damaged=why)


def read_messages(path: str | Path, topics: list[str] | None = None) -> Iterator[BagMessage]:
    """The bag's messages in log-time order. A bag that breaks part way raises
    :class:`BagError` at that point, after every message read before it."""
    path = Path(path)
    _check_path(path)
    reader, why = _open_reader(path)
    if reader is None:
        yield from _stream_mcap(path, topics, why)
        return
    try:
        connections = [c for c in reader.connections if topics is None or c.topic in topics]
        try:
            for connection, time_ns, data in reader.messages(connections=connections):
                yield BagMessage(connection.topic, connection.msgtype, time_ns, bytes(data))
        except Exception as exc:  # truncated chunks, bad CRCs, sqlite errors...
            raise BagError(f"the bag {path} is damaged: {_describe(exc)}") from None
    finally:
        with contextlib.suppress(Exception):  # closing a damaged bag may fail again; the error says why
            reader.close()
