"""
Chat rooms shared by several processes and hosts through Redis pub/sub.

L{RedisFanOut} implements the hub's L{netsvc.chat.hub.Cluster} interface:
rooms, presence, C{/who}, C{/rooms}, topics, history, nickname claims and
private messages are shared by every node on the same Redis.  L{keys} names
what it stores there; L{scripts} holds the Lua that keeps each step atomic.
"""

from netsvc.chat.redis.fanout import RedisFanOut, RedisMetrics

__all__ = ["RedisFanOut", "RedisMetrics"]
