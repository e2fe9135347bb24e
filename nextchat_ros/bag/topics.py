"""Which topics of a bag feed the node: found from the bag's metadata alone, so a
command can refuse a wrong bag or topic before it loads a model."""

from __future__ import annotations

from dataclasses import dataclass

from .io import BagError, BagInfo
from .record import CAMERA_INFO_TYPE, IMAGE_TYPE, QUERY_TYPE, STRING_TYPE, TRUTH_TYPE


@dataclass
class Topics:
    """Which bag topics feed the node."""

    image: str
    camera_info: str | None
    query: str | None  # nextchat_ros/msg/Query
    text_query: str | None  # std_msgs/msg/String
    truth: str | None

    @classmethod
    def detect(cls, info: BagInfo, image: str | None = None, query: str | None = None) -> Topics:
        def one(msgtype: str, chosen: str | None, what: str, required: bool) -> str | None:
            if chosen is not None:
                if chosen not in info.topics:
                    raise BagError(f"the bag has no topic '{chosen}'; it has {sorted(info.topics)}")
                if info.topics[chosen] != msgtype:
                    if required:
                        raise BagError(f"'{chosen}' carries {info.topics[chosen]}; the {what} topic must be "
                                       f"{msgtype}")
                    return None
                return chosen
            found = info.topics_of(msgtype)
            if len(found) > 1:
                raise BagError(f"the bag has several {what} topics {found}; choose one with --{what}-topic")
            if not found and required:
                raise BagError(f"the bag has no {msgtype} topic ({what}); it has "
                               + ", ".join(f"{t} [{m}]" for t, m in sorted(info.topics.items())))
            return found[0] if found else None

        image_topic = one(IMAGE_TYPE, image, "image", True)
        # camera_info: the one beside the image topic (a robot bag may hold several cameras)
        infos = info.topics_of(CAMERA_INFO_TYPE)
        beside = [t for t in infos if t.rsplit("/", 1)[0] == image_topic.rsplit("/", 1)[0]]
        camera_info = beside[0] if beside else (infos[0] if len(infos) == 1 else None)
        topics = cls(image=image_topic, camera_info=camera_info,
                     query=one(QUERY_TYPE, query, "query", False),
                     text_query=one(STRING_TYPE, query, "query", False),
                     truth=one(TRUTH_TYPE, None, "truth", False))
        if topics.query is None and topics.text_query is None:
            raise BagError(f"the bag has no queries: no {QUERY_TYPE} or {STRING_TYPE} topic"
                           + (f" named '{query}'" if query else ""))
        return topics

    def inputs(self) -> list[str]:
        return [t for t in (self.image, self.camera_info, self.query, self.text_query, self.truth) if t]
