"""
The Lua scripts L{netsvc.chat.redis.fanout.RedisFanOut} runs on Redis, each
one atomic step, and the key layout they work on.

Keys (C{P} is the configured prefix, C{netsvc:chat:} by default; room and nick
names are case-folded):

  - C{P room:#name}      pub/sub channel of a room's events (JSON, see fanout.py)
  - C{P node:ID}         pub/sub channel of one node (private messages to its members)
  - C{P alive:ID}        a node is alive while this key exists (expires after nick_ttl)
  - C{P nick:name}       C{ID|Spelling}: who holds a nickname (expires after nick_ttl)
  - C{P who:#name}       hash C{ID|serial} -> display name: the members of a room
  - C{P rooms}           hash folded name -> room name: every room some node has
  - C{P history:#name}   list of a room's last events (JSON), trimmed to the history size
  - C{P topic:#name}     a room's topic

A node refreshes its C{alive} key and its nicknames every third of nick_ttl:
when a node dies, its nicknames are free and its members leave C{/who} within
nick_ttl.  Scripts touch keys derived from their arguments (C{alive} keys of
other nodes), so this layout is for a single Redis (with replicas / Sentinel),
not Redis Cluster.
"""

#: KEYS[1] nick key; ARGV[1] value (ID|Spelling), ARGV[2] ttl seconds, ARGV[3] "ID|".
#: 1 if the nick is now ours (free, or already ours), else 0.
CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[3]) ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

#: KEYS[1] nick key; ARGV[1] "ID|".  Deletes the nick if it is ours.
RELEASE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

#: KEYS[1] alive key, KEYS[2..] nick keys; ARGV[1] "ID|", ARGV[2] ttl, ARGV[2+i] value for KEYS[1+i].
#: The heartbeat (and the re-claim after a reconnect): the indexes (1-based) of the nicks now held elsewhere.
HEARTBEAT = """
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
local lost = {}
for i = 2, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if cur and string.sub(cur, 1, #ARGV[1]) ~= ARGV[1] then
    table.insert(lost, i - 1)
  else
    redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[2])
  end
end
return lost
"""

#: KEYS[1] history list; ARGV[1] channel, ARGV[2] event, ARGV[3] history size.  Keep, then publish.
PUBLISH = """
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""

#: KEYS[1] topic, KEYS[2] history.  {topic, event, event, ...}
LOAD = """
local out = {redis.call('GET', KEYS[1]) or ''}
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(out, e) end
return out
"""

#: KEYS[1] nick key; ARGV[1] node channel prefix, ARGV[2] payload, ARGV[3] this node's ID.
#: Publishes to the node holding the nick; its spelling, or nil (no such nick, or its node is gone).
PRIVMSG = """
local cur = redis.call('GET', KEYS[1])
if not cur then return nil end
local sep = string.find(cur, '|', 1, true)
local node = string.sub(cur, 1, sep - 1)
if node == ARGV[3] then return nil end
if redis.call('PUBLISH', ARGV[1] .. node, ARGV[2]) == 0 then return nil end
return string.sub(cur, sep + 1)
"""

#: Shared by WHO and ROOMS: the live members of one who-hash (dead nodes' entries removed).
_LIVE = """
local alive = {}
local function live(hash, prefix)
  local names = {}
  local all = redis.call('HGETALL', hash)
  for i = 1, #all, 2 do
    local node = string.match(all[i], '^([^|]+)|')
    local ok = alive[node]
    if ok == nil then
      ok = node ~= nil and redis.call('EXISTS', prefix .. node) == 1
      alive[node or ''] = ok
    end
    if ok then table.insert(names, all[i + 1]) else redis.call('HDEL', hash, all[i]) end
  end
  return names
end
"""

#: KEYS[1] who hash; ARGV[1] alive key prefix.  The display names in the room.
WHO = _LIVE + """
return live(KEYS[1], ARGV[1])
"""

#: KEYS[1] rooms hash; ARGV[1] key prefix (P), ARGV[2] lobby (folded).
#: {name, count, topic, ...} for rooms with members (and the lobby); empty rooms are forgotten.
ROOMS = _LIVE + """
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local n = #live(ARGV[1] .. 'who:' .. all[i], ARGV[1] .. 'alive:')
  if n > 0 or all[i] == ARGV[2] then
    table.insert(out, all[i + 1])
    table.insert(out, n)
    table.insert(out, redis.call('GET', ARGV[1] .. 'topic:' .. all[i]) or '')
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return out
"""

#: KEYS[1] alive key, KEYS[2..] nick keys; ARGV[1] "ID|", ARGV[2..] who-hash key, field pairs.
#: A node stopping: its nicks, presence and liveness go at once.
LEAVE = """
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
for i = 2, #ARGV, 2 do redis.call('HDEL', ARGV[i], ARGV[i + 1]) end
return 0
"""
