-- kiln-broker's Redis store: every call is one run of this script, so each state change is
-- atomic (Redis runs a script to its end before any other command). Redis does not roll a
-- script back, so the Rust side validates arguments first and the script never raises.
--
-- The script decides no task state itself: `apply` writes a transition decided in Rust by
-- kiln_broker::lifecycle (compare-and-set on the fields it was decided from) and keeps the
-- queue's indexes in step with it. Only `reserve` changes tasks on its own, because it
-- picks them from the streams: it mirrors lifecycle::claim (state running, attempt + 1, the
-- new lease and worker, lease expiry, first start, progress cleared, one `status` event),
-- which the property test in tests/lifecycle.rs checks against the Rust rules.
--
-- KEYS[1]: the key prefix. ARGV[1]: the operation, ARGV[2]: the calling handle (origin of
-- notifications), ARGV[3]: approximate length cap of the notification stream; the
-- operation's arguments follow. Every reply is {events written, result...}.
local P = KEYS[1]
local op = ARGV[1]
local ORIGIN = ARGV[2]
local NOTIFY_MAX = ARGV[3]
local A = {}
for i = 4, #ARGV do A[#A + 1] = ARGV[i] end
local G = 'kiln'
local evs = {}
local ready = false

local function key(...) return P .. table.concat({...}, ':') end
local function js(s) if s == nil or s == false then return 'null' end return cjson.encode(s) end

local function load(id)
  local h = redis.call('HGETALL', key('task', id))
  if #h == 0 then return nil end
  local t = {}
  for i = 1, #h, 2 do t[h[i]] = h[i + 1] end
  return t
end
local function snap(id) return redis.call('HGETALL', key('task', id)) end
local function set(t, ...)
  local a = {...}
  for i = 1, #a, 2 do t[a[i]] = a[i + 1] end
  redis.call('HSET', key('task', t.id), ...)
end
local function unset(t, ...)
  local a = {...}
  for i = 1, #a do t[a[i]] = nil end
  redis.call('HDEL', key('task', t.id), ...)
end
local function state(t, new)
  if t.state ~= new then
    if t.state then redis.call('HINCRBY', key('counts', t.state), t.task_type, -1) end
    redis.call('HINCRBY', key('counts', new), t.task_type, 1)
    set(t, 'state', new)
  end
end

-- Notifications for other processes: one stream every instance reads with XREAD BLOCK,
-- written only while another instance reads it. A reader names itself in the set `readers`
-- and keeps `reader:{origin}` alive (a key with a TTL, renewed as it reads); a name whose key
-- expired is dropped here.
local listened = nil
local function others_read()
  if listened == nil then
    listened = false
    for _, o in ipairs(redis.call('SMEMBERS', key('readers'))) do
      if redis.call('EXISTS', key('reader', o)) == 0 then
        redis.call('SREM', key('readers'), o)
      elseif o ~= ORIGIN then
        listened = true
      end
    end
  end
  return listened
end
local function note(field, value)
  if others_read() then
    redis.call('XADD', key('notify'), 'MAXLEN', '~', NOTIFY_MAX, '*', 'o', ORIGIN, field, value)
  end
end
-- The webhook outbox (mirrors lifecycle::webhook_messages): a task event its webhook asked
-- for writes a message `msg:{id}` (the task's hash as it is after the change in `snap`),
-- due at once in `whdue` (scored by when it may be claimed), listed in `whtask:{task}`.
-- `task.progress` at most once a second per task (`whp` keeps the last time).
local function wh_event(kind, data)
  if kind == 'completed' or kind == 'progress' then return kind end
  if kind == 'status' then
    local d = cjson.decode(data)
    if d.status == 'running' and not d.cancel_requested then return 'started' end
  end
  return nil
end
-- Global endpoints (`whep`, JSON [{url, events}], stored by the store when it connects)
-- receive every task message of the types they list.
local endpoints = nil
local function outbox(tid, n, kind, data, now)
  local name = wh_event(kind, data)
  if not name then return end
  if endpoints == nil then
    local raw = redis.call('GET', key('whep'))
    endpoints = raw and cjson.decode(raw) or {}
  end
  local event = 'task.' .. name
  local urls = {}
  local h = redis.call('HMGET', key('task', tid), 'webhook', 'webhook_events')
  if h[1] and h[2] then
    for _, e in ipairs(cjson.decode(h[2])) do
      if e == name then urls[#urls + 1] = h[1] end
    end
  end
  for _, ep in ipairs(endpoints) do
    for _, e in ipairs(ep.events) do
      if e == event then urls[#urls + 1] = ep.url end
    end
  end
  if #urls == 0 then return end
  if name == 'progress' then
    local last = redis.call('HGET', key('whp'), tid)
    if last and tonumber(now) - tonumber(last) < 1000 then return end
    redis.call('HSET', key('whp'), tid, now)
  end
  local s = cjson.encode(snap(tid))
  for i, url in ipairs(urls) do
    local id = 'msg_' .. string.sub(redis.sha1hex(P .. tid .. ':' .. n .. ':' .. i), 1, 32)
    redis.call('HSET', key('msg', id), 'id', id, 'task_id', tid, 'url', url, 'event', event,
      'snap', s, 'state', 'pending', 'attempts', '0', 'next_at', now, 'created_at', now)
    redis.call('ZADD', key('whdue'), now, id)
    redis.call('RPUSH', key('whtask', tid), id)
  end
end
local function event(id, kind, data, now)
  local n = redis.call('INCR', key('evseq'))
  local e = '{"id":' .. n .. ',"task_id":' .. js(id) .. ',"kind":"' .. kind .. '","data":' .. data
    .. ',"ts":' .. now .. '}'
  redis.call('RPUSH', key('ev', id), e)
  note('e', e)
  evs[#evs + 1] = e
  outbox(id, n, kind, data, now)
end
-- The data of the `status` event of a claimed task (lifecycle::claim's event).
local function status_data(t)
  return '{"status":"' .. t.state .. '","attempt":' .. (t.attempt or '0') .. ',"worker_id":'
    .. js(t.worker_id) .. '}'
end

-- The ready queue: one stream per route and priority, consumer group `kiln`, the worker id
-- as consumer name. An entry lives from the time its task is queued until its attempt ends
-- (XACK + XDEL); `cursor` mirrors the group's last delivered id for peeking.
--
-- A route is what a task asks of its worker. Tasks that ask nothing beyond their type live in
-- `q:{type}:{priority}`, levels listed in `prios:{type}`. Tasks that name a model or labels
-- live in `rq:{route}:{priority}`, levels in `rprios:{route}`, where route is the SHA-1 of
-- (type, model, labels) and `routes:{type}` maps it to {model, labels JSON}. Every entry of
-- a stream asks the same, so a worker reads only the streams it fits and never has to skip
-- an entry it cannot run: entries stay in their place, in order, for the workers that fit.
local function route_of(t)
  local m, l = t.model or '', t.labels or ''
  if m == '' and l == '' then return nil end
  return redis.sha1hex(cjson.encode({t.task_type, m, l}))
end
-- The ready streams of a type whose route `want` accepts: {stream, priority} pairs. `want`
-- gets {model, labels JSON} ('' for none).
local function levels(tt, want)
  local out = {}
  if want({'', ''}) then
    for _, p in ipairs(redis.call('ZRANGE', key('prios', tt), 0, -1)) do
      out[#out + 1] = {key('q', tt, p), tonumber(p)}
    end
  end
  local routes = redis.call('HGETALL', key('routes', tt))
  for i = 1, #routes, 2 do
    if want(cjson.decode(routes[i + 1])) then
      for _, p in ipairs(redis.call('ZRANGE', key('rprios', routes[i]), 0, -1)) do
        out[#out + 1] = {key('rq', routes[i], p), tonumber(p)}
      end
    end
  end
  return out
end
local function push_ready(t)
  local route = route_of(t)
  local s, prios
  if route then
    s, prios = key('rq', route, t.priority), key('rprios', route)
  else
    s, prios = key('q', t.task_type, t.priority), key('prios', t.task_type)
  end
  if not redis.call('ZSCORE', prios, t.priority) then
    redis.pcall('XGROUP', 'CREATE', s, G, '0', 'MKSTREAM')
    redis.call('ZADD', prios, t.priority, t.priority)
    if route then
      redis.call('HSET', key('routes', t.task_type), route,
        cjson.encode({t.model or '', t.labels or ''}))
    end
  end
  local e = redis.call('XADD', s, '*', 'task', t.id)
  set(t, 'stream', s, 'entry', e)
  redis.call('ZREM', key('delayed'), t.id)
  ready = true
end
local function drop_entry(t)
  if t.entry then
    redis.call('XACK', t.stream, G, t.entry)
    redis.call('XDEL', t.stream, t.entry)
    unset(t, 'stream', 'entry')
  end
end
-- Parks a task just queued again while some worker it avoids still waits out its back-off
-- (see `promote`); forgets the avoidances that are over.
local function park_if_avoided(t, now)
  local av = key('avoid', t.id)
  local last = 0
  local h = redis.call('HGETALL', av)
  for i = 1, #h, 2 do
    local u = tonumber(h[i + 1])
    if u > tonumber(now) then
      if u > last then last = u end
    else
      redis.call('HDEL', av, h[i])
    end
  end
  if last > 0 then
    drop_entry(t)
    redis.call('ZADD', key('parked'), last, t.id)
  end
end
local function off_worker(t)
  redis.call('ZREM', key('running'), t.id)
  if t.worker_id then redis.call('SREM', key('worker', t.worker_id), t.id) end
  drop_entry(t)
end
local function dead(t, now)
  redis.call('XADD', key('dead'), 'MAXLEN', '~', NOTIFY_MAX, '*', 'task', t.id, 'error',
    t.error or 'null', 'attempts', t.attempt or '0', 'ts', now)
end
-- A task a worker rejected retryably is `parked` (park_if_avoided): queued, with no stream
-- entry, scored by the time its last avoidance ends; `avoid:{id}` maps each rejecting worker
-- to its time. `reserve` offers parked tasks to the workers they do not avoid; once every
-- avoidance is over the task goes back to its stream for everyone.
local function promote(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', key('delayed'), '-inf', now)) do
    redis.call('ZREM', key('delayed'), id)
    local t = load(id)
    if t and t.state == 'queued' then
      unset(t, 'not_before')
      push_ready(t)
    end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', key('parked'), '-inf', now)) do
    redis.call('ZREM', key('parked'), id)
    redis.call('DEL', key('avoid', id))
    local t = load(id)
    if t and t.state == 'queued' and not t.entry then push_ready(t) end
  end
end
local function reply(...)
  if ready then note('r', '1') end
  return {evs, ...}
end

-- Stores the task whose 15 arguments (those of `enqueue`) follow A[b]: {tag, task}, tag
-- 'created', or 'exists' when its request_id names a stored task.
local function enqueue_at(b)
  -- A[b + 13]: the data of the task's first `status` event.
  local id, now, tt, prio, input, meta, maxa, deadline, rid, ttl, model, labels =
    A[b + 1], A[b + 2], A[b + 3], A[b + 4], A[b + 5], A[b + 6], A[b + 7], A[b + 8], A[b + 9],
    A[b + 10], A[b + 11], A[b + 12]
  local rkey = key('rid', rid)
  if rid ~= '' then
    local old = redis.call('GET', rkey)
    if old and redis.call('EXISTS', key('task', old)) == 1 then
      return {'exists', snap(old)}
    end
  end
  local seq = redis.call('INCR', key('seq'))
  local t = {id = id}
  set(t, 'id', id, 'task_type', tt, 'priority', prio, 'input', input, 'attempt', '0',
    'max_attempts', maxa, 'cancel_requested', '0', 'dead_lettered', '0', 'created_at', now,
    'seq', tostring(seq))
  if meta ~= '' then set(t, 'metadata', meta) end
  if model ~= '' then set(t, 'model', model) end
  if labels ~= '' then set(t, 'labels', labels) end
  -- A[b + 14], A[b + 15]: the webhook URL and its events (JSON), '' for none.
  if A[b + 14] and A[b + 14] ~= '' then set(t, 'webhook', A[b + 14], 'webhook_events', A[b + 15]) end
  if deadline ~= '' then
    set(t, 'deadline', deadline)
    redis.call('ZADD', key('deadlines'), deadline, id)
  end
  if rid ~= '' then
    set(t, 'request_id', rid)
    -- The idempotency key: SET NX with a TTL (overwritten only when its task is gone).
    if not redis.call('SET', rkey, id, 'NX', 'PX', ttl) then
      redis.call('SET', rkey, id, 'PX', ttl)
    end
  end
  redis.call('ZADD', key('all'), seq, id)
  state(t, 'queued')
  push_ready(t)
  event(id, 'status', A[b + 13], now)
  return {'created', snap(id)}
end

if op == 'enqueue' then
  local r = enqueue_at(0)
  return reply(r[1], r[2])

elseif op == 'enqueue_many' then
  -- A[1]: how many tasks; then, per task, the 15 arguments of `enqueue` and the id of the
  -- task its request_id is expected to name ('' for none). Unless every expectation holds,
  -- nothing is written and the reply lists {index, the task its request_id names or nil}
  -- of those that failed, so the caller can check them and call again.
  local n = tonumber(A[1])
  local bad = {}
  for i = 0, n - 1 do
    local b = 1 + i * 16
    local rid, expect = A[b + 9], A[b + 16]
    if rid ~= '' then
      local old = redis.call('GET', key('rid', rid))
      if old and redis.call('EXISTS', key('task', old)) == 0 then old = nil end
      if (old or '') ~= expect then
        bad[#bad + 1] = i
        bad[#bad + 1] = old and snap(old) or false
      end
    end
  end
  if #bad > 0 then return reply('retry', bad) end
  local out = {}
  for i = 0, n - 1 do
    local r = enqueue_at(1 + i * 16)
    out[#out + 1] = r[1]
    out[#out + 1] = r[2]
  end
  return reply('done', out)

elseif op == 'reserve' then
  -- Arguments: worker, n, lease until, now, then the worker's task types, models and
  -- labels (each a count and the values), then n fresh lease ids.
  local w, n, untl, now, nt = A[1], tonumber(A[2]), A[3], A[4], tonumber(A[5])
  local nm = tonumber(A[6 + nt])
  local nl = tonumber(A[7 + nt + nm])
  local models, labels = {}, {}
  for i = 1, nm do models[A[6 + nt + i]] = true end
  for i = 1, nl do labels[A[7 + nt + nm + i]] = true end
  local function fits(route)
    if route[1] ~= '' and not models[route[1]] then return false end
    if route[2] ~= '' then
      for _, l in ipairs(cjson.decode(route[2])) do
        if not labels[l] then return false end
      end
    end
    return true
  end
  promote(now)
  -- Peek at the undelivered heads of every stream the worker fits, pick the best n
  -- (priority, then age), then deliver exactly those with XREADGROUP, stream by stream.
  local cands = {}
  for i = 1, nt do
    for _, lv in ipairs(levels(A[5 + i], fits)) do
      local s, p = lv[1], lv[2]
      local cur = redis.call('HGET', key('cursor'), s) or '0-0'
      for _, e in ipairs(redis.call('XRANGE', s, '(' .. cur, '+', 'COUNT', n)) do
        -- Age: the entry's time, then the task's submission order (entries of different
        -- streams added in the same millisecond).
        local ms = string.match(e[1], '(%d+)-%d+')
        local sq = tonumber(redis.call('HGET', key('task', e[2][2]), 'seq') or '0') or 0
        cands[#cands + 1] = {p, tonumber(ms), sq, s}
      end
    end
  end
  -- Parked tasks this worker did not reject (or whose avoidance ended) and fits.
  local types = {}
  for i = 1, nt do types[A[5 + i]] = true end
  for _, id in ipairs(redis.call('ZRANGE', key('parked'), 0, 99)) do
    local t = load(id)
    if t and t.state == 'queued' and not t.entry and types[t.task_type]
      and fits({t.model or '', t.labels or ''}) then
      local u = redis.call('HGET', key('avoid', id), w)
      if not (u and tonumber(u) > tonumber(now)) then
        cands[#cands + 1] = {tonumber(t.priority), tonumber(t.created_at), tonumber(t.seq), false, id}
      end
    end
  end
  table.sort(cands, function(a, b)
    if a[1] ~= b[1] then return a[1] > b[1] end
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[3] < b[3]
  end)
  local per, order, direct = {}, {}, {}
  for i = 1, math.min(n, #cands) do
    local s = cands[i][4]
    if not s then
      direct[#direct + 1] = cands[i][5]
    else
      if not per[s] then
        per[s] = 0
        order[#order + 1] = s
      end
      per[s] = per[s] + 1
    end
  end
  local out = {}
  local li = 7 + nt + nm + nl
  local function lease_to(t, tid)
    li = li + 1
    local lease = A[li]
    state(t, 'running')
    set(t, 'attempt', tostring(tonumber(t.attempt) + 1), 'lease', lease, 'worker_id', w,
      'lease_expires_at', untl)
    if not t.started_at then set(t, 'started_at', now) end
    unset(t, 'progress')
    redis.call('ZADD', key('running'), untl, tid)
    redis.call('SADD', key('worker', w), tid)
    redis.call('HSET', key('leases'), lease, tid)
    local l = key('att', tid)
    local k = tonumber(t.attempt)
    local rec = cjson.encode({t.attempt, w, lease, now, '', ''})
    if redis.call('LLEN', l) >= k then
      -- The record of an attempt given back is replaced, and its lease forgotten with it
      -- (as the SQL stores replace the attempt's row).
      local old = cjson.decode(redis.call('LINDEX', l, k - 1))
      if old[3] and old[3] ~= lease then redis.call('HDEL', key('leases'), old[3]) end
      redis.call('LSET', l, k - 1, rec)
    else
      redis.call('RPUSH', l, rec)
    end
    event(tid, 'status', status_data(t), now)
    out[#out + 1] = snap(tid)
  end
  for _, tid in ipairs(direct) do
    redis.call('ZREM', key('parked'), tid)
    lease_to(load(tid), tid)
  end
  for _, s in ipairs(order) do
    local r = redis.call('XREADGROUP', 'GROUP', G, w, 'COUNT', per[s], 'STREAMS', s, '>')
    if r then
      for _, e in ipairs(r[1][2]) do
        redis.call('HSET', key('cursor'), s, e[1])
        local tid = e[2][2]
        local t = load(tid)
        if t and t.state == 'queued' and t.entry == e[1] then
          lease_to(t, tid)
        else
          redis.call('XACK', s, G, e[1])
          redis.call('XDEL', s, e[1])
        end
      end
    end
  end
  return reply(out)

elseif op == 'renew' then
  -- The worker's leases run until at least `until`; its stream entries are re-claimed by
  -- their owner (XCLAIM ... JUSTID), which resets their idle time in the pending list.
  local w, untl = A[1], tonumber(A[2])
  local n = 0
  local claims = {}
  for _, id in ipairs(redis.call('SMEMBERS', key('worker', w))) do
    local t = load(id)
    if t and t.state == 'running' and t.worker_id == w then
      if tonumber(t.lease_expires_at) < untl then
        set(t, 'lease_expires_at', A[2])
        redis.call('ZADD', key('running'), A[2], id)
        n = n + 1
      end
      if t.entry then
        if not claims[t.stream] then claims[t.stream] = {'XCLAIM', t.stream, G, w, '0'} end
        table.insert(claims[t.stream], t.entry)
      end
    else
      redis.call('SREM', key('worker', w), id)
    end
  end
  for _, c in pairs(claims) do
    c[#c + 1] = 'JUSTID'
    redis.call(unpack(c))
  end
  return reply(n)

elseif op == 'leases' then
  local out = {}
  for _, id in ipairs(redis.call('SMEMBERS', key('worker', A[1]))) do
    local t = load(id)
    if t and t.state == 'running' and t.worker_id == A[1] and t.lease then
      out[#out + 1] = t.lease
      out[#out + 1] = id
    end
  end
  return reply(out)

elseif op == 'progress' then
  -- A[4]: the worker that must hold the lease ('' for any).
  local tid = redis.call('HGET', key('leases'), A[1])
  local t = tid and load(tid)
  if t and t.state == 'running' and t.lease == A[1] and (A[4] == '' or t.worker_id == A[4]) then
    set(t, 'progress', A[2])
    event(tid, 'progress', A[2], A[3])
    return reply(tid)
  end
  return reply(false)

elseif op == 'by_lease' then
  -- The task that holds or held lease A[1]: {task id, task} ({false} when none ever did).
  local tid = redis.call('HGET', key('leases'), A[1])
  if not tid then return reply(false) end
  return reply(tid, snap(tid))

elseif op == 'worker_timings' then
  -- A[3]: the worker that must hold the lease ('' for any).
  local tid = redis.call('HGET', key('leases'), A[1])
  local t = tid and load(tid)
  if t and t.state == 'running' and t.lease == A[1] and (A[3] == '' or t.worker_id == A[3]) then
    redis.call('HSET', key('timings', tid), 'worker', A[2])
    return reply(1)
  end
  return reply(0)

elseif op == 'apply' then
  -- A transition of task A[1] decided in Rust from its fields state A[3], lease A[4],
  -- attempt A[5] and cancel_requested A[6]; if any changed since, the caller decides again.
  -- A[7]: the new state; A[8..10]: the attempt record to end (number, end time, error; ''
  -- for none); A[11]: a retryable reject's avoid-until for the task's worker ('' for none);
  -- A[12]: how many fields change, then (name, value) pairs ('' unsets); then how many
  -- events, then (kind, data) pairs.
  local tid, now = A[1], A[2]
  local t = load(tid)
  if not t then return reply('none') end
  if t.state ~= A[3] or (t.lease or '') ~= A[4] or (t.attempt or '0') ~= A[5]
    or (t.cancel_requested or '0') ~= A[6] then
    return reply('retry')
  end
  local was, st = t.state, A[7]
  if A[8] ~= '' then
    local l, i = key('att', tid), tonumber(A[8])
    local raw = i >= 1 and redis.call('LINDEX', l, i - 1)
    if raw then
      local a = cjson.decode(raw)
      a[5] = A[9]
      a[6] = A[10]
      redis.call('LSET', l, i - 1, cjson.encode(a))
    end
  end
  if A[11] ~= '' and t.worker_id then redis.call('HSET', key('avoid', tid), t.worker_id, A[11]) end
  if was == 'running' and st ~= 'running' then off_worker(t) end
  if was == 'queued' and st ~= 'queued' then drop_entry(t) end
  state(t, st)
  local was_dead = t.dead_lettered
  local n = tonumber(A[12])
  for i = 1, n do
    local name, v = A[11 + 2 * i], A[12 + 2 * i]
    if name == 'not_before' and v ~= '' and tonumber(v) <= tonumber(now) then v = '' end
    if v == '' then
      if t[name] then unset(t, name) end
    else
      set(t, name, v)
    end
  end
  if st == 'queued' and was ~= 'queued' then
    -- A task retried after it ended is back under its deadline (if it kept one).
    if t.deadline then redis.call('ZADD', key('deadlines'), t.deadline, tid) end
    if t.not_before then
      redis.call('ZADD', key('delayed'), t.not_before, tid)
    else
      push_ready(t)
      park_if_avoided(t, now)
    end
  elseif st ~= 'queued' and st ~= 'running' then
    redis.call('ZREM', key('deadlines'), tid)
    redis.call('ZREM', key('delayed'), tid)
    redis.call('ZREM', key('parked'), tid)
    redis.call('DEL', key('avoid', tid))
    if t.dead_lettered == '1' and was_dead ~= '1' then dead(t, now) end
  end
  local e = 13 + 2 * n
  for i = 1, tonumber(A[e]) do
    event(tid, A[e + 2 * i - 1], A[e + 2 * i], now)
  end
  return reply('ok', snap(tid))

elseif op == 'due' then
  -- Tasks whose lease lapsed, then tasks whose deadline passed, before A[1].
  local now = A[1]
  local lapsed, late = {}, {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', key('running'), '-inf', '(' .. now)) do
    local t = load(id)
    if t and t.state == 'running' then
      lapsed[#lapsed + 1] = snap(id)
    else
      redis.call('ZREM', key('running'), id)
    end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', key('deadlines'), '-inf', '(' .. now)) do
    local t = load(id)
    if t and (t.state == 'queued' or t.state == 'running') then
      late[#late + 1] = snap(id)
    else
      redis.call('ZREM', key('deadlines'), id)
    end
  end
  return reply(lapsed, late)

elseif op == 'held' then
  -- The tasks worker A[1] runs.
  local out = {}
  for _, id in ipairs(redis.call('SMEMBERS', key('worker', A[1]))) do
    local t = load(id)
    if t and t.state == 'running' and t.worker_id == A[1] then
      out[#out + 1] = snap(id)
    else
      redis.call('SREM', key('worker', A[1]), id)
    end
  end
  return reply(out)

elseif op == 'note_types' then
  for i = 2, #A do
    local old = tonumber(redis.call('HGET', key('types'), A[i]) or '0')
    if tonumber(A[1]) > old then redis.call('HSET', key('types'), A[i], A[1]) end
  end
  return reply(true)

elseif op == 'types_seen' then
  local out = {}
  local h = redis.call('HGETALL', key('types'))
  for i = 1, #h, 2 do
    if tonumber(h[i + 1]) >= tonumber(A[1]) then out[#out + 1] = h[i] end
  end
  table.sort(out)
  return reply(out)
elseif op == 'assignment' then
  -- A[2] '1': one more assignment of the running lease A[1] failed on the transport; '0':
  -- one was acknowledged (the count starts again). Replies the count, -1 if not current.
  local tid = redis.call('HGET', key('leases'), A[1])
  local t = tid and load(tid)
  if not t or t.lease ~= A[1] or t.state ~= 'running' then return reply(-1) end
  if A[2] == '1' then
    return reply(redis.call('HINCRBY', key('task', tid), 'assign_failures', 1))
  end
  redis.call('HDEL', key('task', tid), 'assign_failures')
  return reply(0)

elseif op == 'position' then
  local t = load(A[1])
  if not t or t.state ~= 'queued' then return reply(false) end
  -- Tasks of the same type and model ahead of this one, across their routes' streams.
  local n = 0
  local mine = tonumber(t.priority)
  local model = t.model or ''
  for _, lv in ipairs(levels(t.task_type, function(route) return route[1] == model end)) do
    local s, p = lv[1], lv[2]
    -- Undelivered entries: the stream's length less its pending (delivered) entries.
    local undelivered = redis.call('XLEN', s) - redis.call('XPENDING', s, G)[1]
    if p > mine or (p == mine and not t.entry) then
      n = n + undelivered
    elseif p == mine then
      local cur = redis.call('HGET', key('cursor'), s) or '0-0'
      n = n + #redis.call('XRANGE', s, '(' .. cur, '(' .. t.entry)
    end
  end
  return reply(n)

elseif op == 'list' then
  local st, tt, before, limit, budget = A[1], A[2], A[3], tonumber(A[4]), tonumber(A[5])
  local max = '+inf'
  if before ~= '' then max = '(' .. before end
  local out = {}
  local offset = 0
  while #out < limit and offset < budget do
    local ids = redis.call('ZREVRANGEBYSCORE', key('all'), max, '-inf', 'LIMIT', offset, 200)
    if #ids == 0 then break end
    offset = offset + #ids
    for _, id in ipairs(ids) do
      local ok = true
      if st ~= '' or tt ~= '' then
        local v = redis.call('HMGET', key('task', id), 'state', 'task_type')
        ok = (st == '' or v[1] == st) and (tt == '' or v[2] == tt)
      end
      if ok then
        out[#out + 1] = snap(id)
        if #out >= limit then break end
      end
    end
  end
  return reply(out)

-- The webhook outbox's own operations (see `outbox` above).
elseif op == 'wh_claim' then
  -- Up to A[2] due messages leased to A[1] until A[3], at A[4]; a leased message is scored
  -- by its lease's end, so it is due again once the lease lapsed.
  local holder, n, untl, now = A[1], tonumber(A[2]), A[3], A[4]
  local out = {}
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', key('whdue'), '-inf', now, 'LIMIT', 0, n)) do
    local m = key('msg', id)
    local url = redis.call('HGET', m, 'url')
    if not url then
      redis.call('ZREM', key('whdue'), id)
    elseif redis.call('HEXISTS', key('whdis'), url) == 1 then
      redis.call('HSET', m, 'state', 'disabled')
      redis.call('HDEL', m, 'lease_holder', 'lease_until')
      redis.call('ZREM', key('whdue'), id)
    else
      redis.call('HSET', m, 'lease_holder', holder, 'lease_until', untl)
      redis.call('ZADD', key('whdue'), tonumber(untl) + 1, id)
      out[#out + 1] = redis.call('HGETALL', m)
    end
  end
  return reply(out)

elseif op == 'wh_record' then
  -- Message A[1] held by A[2]: body A[3], the attempt (JSON) A[4], the new state A[5], due
  -- at A[6] when pending, at A[7].
  local id, holder = A[1], A[2]
  local m = key('msg', id)
  local h = redis.call('HMGET', m, 'lease_holder', 'state', 'url', 'body')
  if h[1] ~= holder or h[2] ~= 'pending' then return reply(0) end
  redis.call('HINCRBY', m, 'attempts', 1)
  redis.call('RPUSH', key('whatt', id), A[4])
  if not h[4] then redis.call('HSET', m, 'body', A[3]) end
  redis.call('HSET', m, 'state', A[5])
  redis.call('HDEL', m, 'lease_holder', 'lease_until')
  if A[5] == 'pending' then
    redis.call('HSET', m, 'next_at', A[6])
    redis.call('ZADD', key('whdue'), A[6], id)
  else
    redis.call('ZREM', key('whdue'), id)
  end
  if A[5] == 'disabled' then redis.call('HSET', key('whdis'), h[3], A[7]) end
  return reply(1)

elseif op == 'wh_retry' then
  local id, now = A[1], A[2]
  local m = key('msg', id)
  local h = redis.call('HMGET', m, 'state', 'url')
  if not h[1] then return reply('none') end
  if h[1] ~= 'delivered' then
    redis.call('HDEL', key('whdis'), h[2])
    redis.call('HSET', m, 'state', 'pending', 'next_at', now)
    redis.call('HDEL', m, 'lease_holder', 'lease_until')
    redis.call('ZADD', key('whdue'), now, id)
  end
  return reply('ok', redis.call('HGETALL', m))

elseif op == 'wh_add' then
  -- A[1]: now, A[2]: how many, then (id, url, event, payload) per message.
  local now = A[1]
  for i = 1, tonumber(A[2]) do
    local b = 2 + (i - 1) * 4
    local id = A[b + 1]
    redis.call('HSET', key('msg', id), 'id', id, 'url', A[b + 2], 'event', A[b + 3],
      'payload', A[b + 4], 'state', 'pending', 'attempts', '0', 'next_at', now, 'created_at', now)
    redis.call('ZADD', key('whdue'), now, id)
  end
  return reply(1)

elseif op == 'wh_read' then
  -- The messages A[2..] (or, with A[1] = 'task', those of task A[2]), each {hash, attempts}.
  local ids = {}
  if A[1] == 'task' then
    ids = redis.call('LRANGE', key('whtask', A[2]), 0, -1)
  else
    ids = {A[2]}
  end
  local out = {}
  for _, id in ipairs(ids) do
    local h = redis.call('HGETALL', key('msg', id))
    if #h > 0 then out[#out + 1] = {h, redis.call('LRANGE', key('whatt', id), 0, -1)} end
  end
  return reply(out)

elseif op == 'wh_pending' then
  return reply(redis.call('ZCARD', key('whdue')))
end
return redis.error_reply('unknown operation ' .. tostring(op))
