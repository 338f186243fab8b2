-- presenced for Neovim: every normal file buffer joins a topic on the
-- presenced daemon. The first editor to join a topic owns it and may edit;
-- every later one is a spectator whose buffer is 'nomodifiable' and
-- 'readonly' until it is promoted. See :help presenced and docs/protocol.md.
--
-- State lives in three tables:
--   buffers[bufnr] = { topic, saved, last_message }  one per attached buffer
--   entries[topic] = { ... }  one per topic this editor holds, shared by the
--                             buffers on that topic (the daemon refuses a
--                             second entry for one topic and key on one
--                             connection)
--   by_ref[ref]    = entry    to route `role` events, which name the ref
-- and `link` describes the connection.

local connection = require('presenced.connection')
local is_null = connection.is_null
local uv = vim.loop

local M = {}

local levels = vim.log.levels

local defaults = {
  -- The daemon's socket; nil finds it as the presence CLI does.
  socket = nil,
  -- The presence program, run to start a daemon when none answers.
  presence_cmd = 'presence',
  -- Start a daemon when none answers. Never done after the daemon said
  -- it was shutting down: whoever stopped it will start it again.
  autostart = true,
  -- The topic of a buffer, given its number and resolved absolute path;
  -- nil or '' leaves the buffer alone.
  topic = function(_, path)
    return 'file:' .. path
  end,
  -- Who you are on the topic: a string, or a function(bufnr); nil means
  -- the login name, as `presence join` uses.
  key = nil,
  -- Extra meta fields for others to see: a table, or a function(bufnr).
  meta = nil,
  -- When the daemon cannot be reached: 'editable' opens (or leaves) the
  -- buffer editable with a warning; 'readonly' makes it read-only until
  -- the daemon answers.
  on_unreachable = 'editable',
  -- How long opening a buffer waits for its role, so that a spectator
  -- never shows an editable buffer first. Past it the role arrives later.
  join_wait_ms = 1500,
  -- How long quitting waits for the daemon to confirm the leaves.
  leave_wait_ms = 500,
  -- How long to keep trying to get back to a daemon that went away.
  reconnect_timeout_ms = 30000,
}

local config = vim.deepcopy(defaults)
local configured = false

local buffers = {}
local entries = {}
local by_ref = {}
-- Entries left while disconnected, {token, ref, topic}: resumed on the next
-- connection only to be untracked, so the next in line need not wait for
-- the daemon's grace period to run out.
local orphans = {}

local link = {
  -- 'idle': not connected, not trying; 'connecting': trying (first time,
  -- or after the connection closed); 'up': connected.
  state = 'idle',
  conn = nil,
  -- Bumped by every new try and by quitting: a callback of an older try
  -- sees it changed and does nothing.
  generation = 0,
  -- Why the daemon could not be reached, while state is 'idle'.
  error = nil,
  -- Set while getting back after the connection closed.
  reconnecting = false,
  -- The pending retry timer and folder watch of a reconnect.
  timer = nil,
  watcher = nil,
  -- The current spell without a working connection, from the first close:
  -- { deadline, pause, started_daemon }. A connection the daemon closes
  -- before answering anything (one over --max-connections, say) does not
  -- end it, so such closes cannot restart the deadline forever.
  outage = nil,
  -- Set when a wait for a role ran out: later buffers do not wait again
  -- until the daemon answers, so opening many files at once blocks for
  -- at most one join_wait_ms.
  slow = false,
}

-- Helpers ---------------------------------------------------------------

local function notify(message, level)
  vim.notify('presenced: ' .. message, level or levels.INFO)
end

local function login_name()
  local ok, passwd = pcall(uv.os_get_passwd)
  if ok and type(passwd) == 'table' and passwd.username then
    return passwd.username
  end
  return vim.env.USER or vim.env.LOGNAME or tostring(uv.getuid())
end

-- The socket, found as the CLI finds it (docs/protocol.md, section 1).
function M.socket_path()
  if config.socket and config.socket ~= '' then
    return vim.fn.expand(config.socket)
  end
  local from_env = vim.env.PRESENCE_SOCKET
  if from_env and from_env ~= '' then
    return from_env
  end
  local runtime = vim.env.XDG_RUNTIME_DIR
  if runtime and runtime ~= '' then
    return runtime .. '/presenced/presenced.sock'
  end
  return '/tmp/presenced-' .. uv.getuid() .. '/presenced.sock'
end

-- The absolute path with symbolic links resolved; for a file that does
-- not exist yet, its folder's resolved path and its name.
local function resolve_path(name)
  local full = vim.fn.fnamemodify(name, ':p')
  local real = uv.fs_realpath(full)
  if real then
    return real
  end
  local folder = uv.fs_realpath(vim.fn.fnamemodify(full, ':h'))
  if not folder then
    return full
  end
  local tail = vim.fn.fnamemodify(full, ':t')
  return folder:sub(-1) == '/' and folder .. tail or folder .. '/' .. tail
end

-- A loaded buffer holding a file: no special 'buftype', a name that is not
-- a URL (fugitive://, scp://, ...), and not a folder. An unloaded buffer is
-- not open: :saveas renames its old name's unloaded alternate buffer.
local function is_file_buffer(bufnr)
  if
    not vim.api.nvim_buf_is_valid(bufnr)
    or not vim.api.nvim_buf_is_loaded(bufnr)
    or vim.bo[bufnr].buftype ~= ''
  then
    return false
  end
  local name = vim.api.nvim_buf_get_name(bufnr)
  return name ~= '' and not name:match('^%a[%w+.-]*://') and vim.fn.isdirectory(name) == 0
end

local function topic_of(bufnr)
  local path = resolve_path(vim.api.nvim_buf_get_name(bufnr))
  local ok, topic = pcall(config.topic, bufnr, path)
  if not ok then
    notify('the topic function failed for ' .. path .. ': ' .. tostring(topic), levels.ERROR)
    return nil
  end
  if type(topic) ~= 'string' or topic == '' then
    return nil
  end
  return topic, path
end

local function key_of(bufnr)
  local key = config.key
  if type(key) == 'function' then
    key = key(bufnr)
  end
  if type(key) ~= 'string' or key == '' then
    key = login_name()
  end
  return key
end

local function editor_name()
  local ok, version = pcall(vim.version)
  if ok and type(version) == 'table' then
    return ('nvim %d.%d.%d'):format(version.major, version.minor, version.patch)
  end
  return 'nvim'
end

-- What others see of this entry. `user`, `pid` and the like are reserved
-- for the daemon, which fills them in from the socket's credentials.
local function meta_of(bufnr, path)
  local meta = { editor = editor_name(), file = path, login = login_name() }
  local extra = config.meta
  if type(extra) == 'function' then
    extra = extra(bufnr)
  end
  if type(extra) == 'table' then
    meta = vim.tbl_extend('force', meta, extra)
  end
  return meta
end

-- `alice (pid 4242)`, as the CLI names an owner.
local function who(owner)
  if is_null(owner) or type(owner) ~= 'table' then
    return 'nobody'
  end
  return ('%s (pid %s)'):format(owner.key, owner.pid)
end

local function display_name(bufnr)
  return vim.fn.fnamemodify(vim.api.nvim_buf_get_name(bufnr), ':~:.')
end

-- The standing fields of a track reply, a role event or a resume.
local function standing_of(fields)
  return {
    role = fields.role,
    readonly = fields.readonly,
    position = fields.position,
    owner = fields.owner,
  }
end

-- Buffer options --------------------------------------------------------

-- Makes the buffer read-only, remembering the user's own settings the
-- first time, to give them back on promotion.
local function restrict(bufnr)
  local buf = buffers[bufnr]
  if not buf.saved then
    buf.saved = { modifiable = vim.bo[bufnr].modifiable, readonly = vim.bo[bufnr].readonly }
  end
  -- Set every time: reading the file again (:edit!) resets 'readonly'.
  vim.bo[bufnr].modifiable = false
  vim.bo[bufnr].readonly = true
end

-- Gives the user's settings back; true if the buffer was restricted.
local function unrestrict(bufnr)
  local buf = buffers[bufnr]
  if not buf or not buf.saved then
    return false
  end
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.bo[bufnr].modifiable = buf.saved.modifiable
    vim.bo[bufnr].readonly = buf.saved.readonly
  end
  buf.saved = nil
  return true
end

-- Says `message` about the buffer, unless it is what was last said.
local function tell(bufnr, message, level)
  local buf = buffers[bufnr]
  if buf.last_message == message then
    return
  end
  buf.last_message = message
  notify(display_name(bufnr) .. ': ' .. message, level)
end

-- Puts the buffer in the state its entry calls for, and says why when
-- that changes.
local function apply(bufnr)
  local buf = buffers[bufnr]
  local entry = buf and entries[buf.topic]
  if not entry or not vim.api.nvim_buf_is_valid(bufnr) then
    return
  end
  if entry.status == 'joined' then
    local standing = entry.standing
    if standing.role == 'owner' then
      if unrestrict(bufnr) then
        tell(bufnr, 'you are the owner now; editable again')
      else
        buf.last_message = nil
      end
    else
      local modified = vim.bo[bufnr].modified
      restrict(bufnr)
      local message = who(standing.owner) .. ' is editing; read-only'
      if modified then
        message = message .. ' (your unsaved changes are kept)'
      end
      tell(bufnr, message, levels.WARN)
    end
  elseif entry.status == 'unreachable' then
    local reason = ('cannot reach the daemon at %s (%s)'):format(M.socket_path(), link.error or 'no answer')
    if config.on_unreachable == 'readonly' then
      restrict(bufnr)
      tell(bufnr, reason .. '; read-only until it answers', levels.WARN)
    else
      unrestrict(bufnr)
      tell(bufnr, reason .. '; editable, but nobody else will know you are editing it', levels.WARN)
    end
  elseif entry.status == 'refused' then
    unrestrict(bufnr)
    tell(bufnr, 'the daemon refused to track it (' .. entry.error .. '); editable', levels.WARN)
  end
  -- 'joining': left as it is until the answer comes.
end

-- Applies the entry's state to its buffers, then lets the statusline and
-- any `User PresencedRole` autocommand see it.
local function apply_entry(entry)
  for bufnr in pairs(entry.bufs) do
    apply(bufnr)
  end
  vim.cmd('redrawstatus!')
  vim.api.nvim_exec_autocmds('User', { pattern = 'PresencedRole', modeline = false })
end

local function set_standing(entry, standing)
  link.slow = false
  entry.status = 'joined'
  entry.standing = standing
  apply_entry(entry)
end

-- Presences seen through the subscription -------------------------------

-- Adds the metas of a Phoenix-shaped `{key: {metas: [...]}}` to `into`,
-- keyed by ref.
local function add_metas(into, presences)
  if type(presences) ~= 'table' then
    return
  end
  for key, presence in pairs(presences) do
    for _, meta in ipairs(type(presence) == 'table' and presence.metas or {}) do
      into[meta.phx_ref] = vim.tbl_extend('force', meta, { key = key })
    end
  end
end

local function on_presence_event(message)
  local entry = entries[message.topic]
  if not entry then
    return
  end
  if message.event == 'presence_state' then
    -- A state replaces the whole view, even one not asked for (section 14).
    entry.metas = {}
    add_metas(entry.metas, message.payload)
  else
    local payload = message.payload or {}
    if type(payload.leaves) == 'table' then
      for _, presence in pairs(payload.leaves) do
        for _, meta in ipairs(presence.metas or {}) do
          entry.metas[meta.phx_ref] = nil
        end
      end
    end
    add_metas(entry.metas, payload.joins)
  end
end

-- The entries on the topic in queue order (owner first).
local function queue_of(entry)
  local list = {}
  for _, meta in pairs(entry.metas or {}) do
    table.insert(list, meta)
  end
  table.sort(list, function(a, b)
    return a.seq < b.seq
  end)
  return list
end

-- Talking to the daemon -------------------------------------------------

local connect -- defined below; tracking may need to connect first

local function track(entry)
  local conn = link.conn
  entry.tracking = true
  conn:request({
    op = 'track',
    topic = entry.topic,
    key = entry.key,
    meta = entry.meta,
    -- The entry dies with the connection, so a killed editor's
    -- spectators are promoted at once.
    lifetime = 'connection',
    subscribe = true,
  }, function(reply)
    entry.tracking = false
    if reply.ok and entry.left then
      -- The buffer went while the track was on its way.
      if conn.open then
        conn:request({ op = 'untrack', topic = entry.topic, ref = reply.ref })
        if not entries[entry.topic] then
          conn:request({ op = 'unsubscribe', topic = entry.topic })
        end
      end
      return
    end
    if entry.left or conn ~= link.conn then
      return
    end
    if reply.ok then
      entry.ref = reply.ref
      entry.token = reply.resume_token
      entry.seq = reply.seq
      by_ref[reply.ref] = entry
      set_standing(entry, standing_of(reply))
    elseif reply.error.code ~= 'disconnected' then
      -- A disconnect is retried by the reconnect; anything else is final.
      entry.status = 'refused'
      entry.error = reply.error.message
      link.slow = false
      apply_entry(entry)
    end
  end)
end

local function join(entry)
  entry.status = 'joining'
  if link.state == 'up' then
    track(entry)
  elseif link.state == 'idle' then
    connect()
  end
  -- 'connecting': the new connection tracks it once up.
end

local function leave(entry)
  entry.left = true
  if entry.ref then
    by_ref[entry.ref] = nil
  end
  if link.state == 'up' and entry.ref then
    link.conn:request({ op = 'untrack', topic = entry.topic, ref = entry.ref })
    if not entries[entry.topic] then
      link.conn:request({ op = 'unsubscribe', topic = entry.topic })
    end
  elseif entry.token then
    table.insert(orphans, { token = entry.token, ref = entry.ref, topic = entry.topic })
  end
  -- A track still on its way is untracked when its reply comes.
end

-- Starts a daemon through the CLI, which waits until it serves the socket.
local function start_daemon(path, callback)
  local stderr = {}
  local command = { config.presence_cmd, '--socket', path, 'list', '--json' }
  local ok, job = pcall(vim.fn.jobstart, command, {
    stdout_buffered = true,
    stderr_buffered = true,
    on_stderr = function(_, data)
      stderr = data or {}
    end,
    on_exit = function(_, code)
      if code == 0 then
        callback(nil)
        return
      end
      local said = table.concat(vim.tbl_filter(function(line)
        return line ~= ''
      end, stderr), ' ')
      callback(('could not start a daemon: `%s list` exited with status %d%s'):format(
        config.presence_cmd,
        code,
        said ~= '' and (': ' .. said) or ''
      ))
    end,
  })
  if not ok or type(job) ~= 'number' or job <= 0 then
    callback(('could not start a daemon: cannot run `%s`%s'):format(
      config.presence_cmd,
      ok and '' or (': ' .. tostring(job))
    ))
  end
end

-- Whether a failed connect means nobody serves the socket, as opposed to,
-- say, a permission problem a new daemon would not fix.
local function worth_starting(err)
  return err:match('^ENOENT') ~= nil or err:match('^ECONNREFUSED') ~= nil
end

-- libuv names only the errno; say what it means here.
local function describe(err)
  local meanings = {
    ENOENT = 'no socket there',
    ECONNREFUSED = 'nothing listens on it',
    EACCES = 'permission denied',
    ENOTSOCK = 'not a socket',
  }
  local name = err:match('^(E%u+)')
  return meanings[name] and (meanings[name] .. ' (' .. name .. ')') or err
end

local function stop_retrying()
  if link.timer then
    link.timer:stop()
    link.timer:close()
    link.timer = nil
  end
  if link.watcher then
    link.watcher:stop()
    link.watcher:close()
    link.watcher = nil
  end
end

local handlers = {}

-- Tracks every entry that has no place yet: new ones, ones that expired
-- while away, and ones that could not be tracked before.
local function track_unjoined(conn)
  for _, entry in pairs(entries) do
    if conn ~= link.conn then
      return
    end
    if not entry.ref and not entry.tracking then
      entry.status = 'joining'
      track(entry)
    end
  end
end

-- Gets back everything after a (re)connect, as docs/protocol.md section 13
-- says: resume every token, compare the standings, track again what the
-- daemon no longer has, and subscribe again.
local function restore(conn)
  local tokens, owner_of_token = {}, {}
  for _, entry in pairs(entries) do
    if entry.token then
      table.insert(tokens, entry.token)
      owner_of_token[entry.token] = entry
    end
  end
  local leaving = orphans
  orphans = {}
  for _, orphan in ipairs(leaving) do
    table.insert(tokens, orphan.token)
  end
  if #tokens == 0 then
    track_unjoined(conn)
    return
  end
  conn:request({ op = 'resume', tokens = tokens }, function(reply)
    if conn ~= link.conn then
      return
    end
    if not reply.ok and reply.error.code == 'disconnected' then
      -- Closed before it answered (a connection accepted by a daemon that
      -- was dying, say): the next connection resumes with the same tokens.
      vim.list_extend(orphans, leaving)
      return
    end
    if not reply.ok then
      -- Not expected of a resume; start over with new entries.
      reply = { roles = {}, expired = tokens, resumed = {} }
    end
    for ref, standing in pairs(is_null(reply.roles) and {} or reply.roles) do
      local entry = by_ref[ref]
      if entry then
        -- Unchanged roles say nothing: apply() only speaks of changes.
        set_standing(entry, standing_of(standing))
        conn:request({ op = 'subscribe', topic = entry.topic })
      end
    end
    for _, orphan in ipairs(leaving) do
      if vim.tbl_contains(reply.resumed or {}, orphan.ref) then
        conn:request({ op = 'untrack', topic = orphan.topic, ref = orphan.ref })
      end
    end
    -- Entries the daemon no longer has (expired), or would not give back
    -- (refused): their place is lost, so they join at the end again.
    local gone = vim.list_extend({}, reply.expired or {})
    vim.list_extend(gone, vim.tbl_keys(is_null(reply.refused) and {} or reply.refused))
    for _, token in ipairs(gone) do
      local entry = owner_of_token[token]
      if entry and entries[entry.topic] == entry then
        by_ref[entry.ref] = nil
        entry.ref, entry.token = nil, nil
      end
    end
    track_unjoined(conn)
  end)
end

local function connected(conn)
  stop_retrying()
  link.conn = conn
  link.state = 'up'
  link.error = nil
  link.reconnecting = false
  -- Whatever restore() sends (perhaps nothing), this gets an answer from a
  -- daemon that really serves us, which ends the outage (conn.answered).
  conn:request({ op = 'ping' })
  restore(conn)
end

-- The daemon cannot be reached: every entry without a connection falls
-- back to `on_unreachable`. A later buffer, or :PresenceReconnect, tries
-- again.
local function unreachable(reason)
  stop_retrying()
  link.outage = nil
  link.slow = false
  link.state = 'idle'
  link.conn = nil
  link.error = reason
  link.reconnecting = false
  for _, entry in pairs(entries) do
    entry.tracking = false
    entry.status = 'unreachable'
    apply_entry(entry)
  end
end

-- Opens a connection, starting a daemon once if none answers and that is
-- allowed, and keeps trying with growing pauses until `deadline` (uv.now()
-- milliseconds); nil tries only once. With `outage`, the pause and whether
-- a daemon was started carry over from the tries before; with `delay`, the
-- first attempt waits a pause too.
local function try_connecting(options)
  local generation = link.generation
  local path = M.socket_path()
  local outage = options.outage or { pause = 50, started_daemon = false }
  local attempting = false

  local attempt

  -- Wakes the next attempt early when the socket's name changes in its
  -- folder (a daemon binding it). Without the watch, the pauses alone
  -- pace the attempts.
  local function watch_socket_folder()
    local watcher = uv.new_fs_event()
    if not watcher then
      return
    end
    local name = vim.fn.fnamemodify(path, ':t')
    local function on_change(err, file)
      if err or file ~= name then
        return
      end
      vim.schedule(function()
        if generation == link.generation and not attempting and link.timer then
          link.timer:stop()
          attempt()
        end
      end)
    end
    -- luv reports a failure to start by its return value (nil, err).
    local ok, started = pcall(watcher.start, watcher, vim.fn.fnamemodify(path, ':h'), {}, on_change)
    if ok and started then
      link.watcher = watcher
    else
      watcher:close()
    end
  end

  -- Waits for the next attempt: a pause that doubles up to 1 s, or less
  -- if the socket appears first.
  local function wait_and_retry()
    local left = options.deadline - uv.now()
    link.timer = link.timer or uv.new_timer()
    link.timer:start(math.max(0, math.min(outage.pause, left)), 0, vim.schedule_wrap(attempt))
    outage.pause = math.min(outage.pause * 2, 1000)
    if not link.watcher then
      watch_socket_folder()
    end
  end

  attempt = function()
    if generation ~= link.generation or attempting or link.state == 'up' then
      return
    end
    attempting = true
    connection.open(path, handlers, function(err, conn)
      attempting = false
      if generation ~= link.generation then
        if conn then
          conn:close()
        end
        return
      end
      if conn then
        connected(conn)
        return
      end
      if options.autostart and config.autostart and not outage.started_daemon and worth_starting(err) then
        outage.started_daemon = true
        start_daemon(path, function(start_err)
          if generation ~= link.generation then
            return
          end
          if start_err and not options.deadline then
            unreachable(start_err)
          elseif start_err then
            -- Perhaps another editor is starting one: keep trying.
            link.error = start_err
            wait_and_retry()
          else
            attempt()
          end
        end)
        return
      end
      if options.deadline and uv.now() < options.deadline then
        link.error = describe(err)
        wait_and_retry()
      else
        unreachable(options.reason and (options.reason .. ', and it did not come back: ' .. describe(err)) or describe(err))
      end
    end)
  end

  if options.delay then
    wait_and_retry()
  else
    attempt()
  end
end

connect = function()
  if link.state ~= 'idle' then
    return
  end
  link.state = 'connecting'
  link.generation = link.generation + 1
  link.outage = nil
  try_connecting({ autostart = true })
end

function handlers.on_event(conn, message)
  if conn ~= link.conn then
    return
  end
  if message.event == 'role' then
    local payload = message.payload
    local entry = by_ref[payload.ref]
    if entry then
      set_standing(entry, standing_of(payload))
    end
  elseif message.event == 'presence_state' or message.event == 'presence_diff' then
    on_presence_event(message)
  end
  -- `shutdown` is noted by the connection and handled when it closes.
end

-- The connection closed: keep every buffer as it is (the daemon keeps the
-- places for a grace period) and get back within reconnect_timeout_ms.
function handlers.on_close(conn, reason, shutdown_reason)
  if conn ~= link.conn then
    return
  end
  link.conn = nil
  link.state = 'connecting'
  link.reconnecting = true
  link.generation = link.generation + 1
  for _, entry in pairs(entries) do
    entry.tracking = false
  end
  local why = shutdown_reason and ('the daemon shut down (' .. shutdown_reason .. ')') or reason
  if conn.refusal then
    why = 'the daemon refused the connection (' .. conn.refusal .. ')'
  end
  -- A connection that never got an answer does not end the outage: keep
  -- its deadline and pauses, or a daemon that accepts and at once closes
  -- would be reconnected to in a loop that never stops.
  if conn.answered or not link.outage then
    link.outage = {
      deadline = uv.now() + config.reconnect_timeout_ms,
      pause = 50,
      started_daemon = false,
    }
  elseif uv.now() >= link.outage.deadline then
    unreachable(why)
    return
  end
  try_connecting({
    -- A daemon stopped on purpose is restarted by whoever stopped it; one
    -- that crashed may be replaced (its lock keeps it to one daemon).
    autostart = shutdown_reason == nil,
    deadline = link.outage.deadline,
    outage = link.outage,
    delay = not conn.answered,
    reason = why,
  })
end

-- Buffers ---------------------------------------------------------------

-- Stops following a buffer; its entry leaves when it was the last buffer
-- on the topic. The user's settings come back, since the buffer may be
-- loaded again (after :bdelete) and must start from them.
local function detach(bufnr)
  local buf = buffers[bufnr]
  if not buf then
    return
  end
  unrestrict(bufnr)
  buffers[bufnr] = nil
  local entry = entries[buf.topic]
  if not entry then
    return
  end
  entry.bufs[bufnr] = nil
  if next(entry.bufs) then
    return
  end
  entries[buf.topic] = nil
  leave(entry)
end

-- Follows a buffer that was read or created. `wait` waits (up to
-- join_wait_ms) for its role, so a spectator never looks editable.
local function attach(bufnr, wait)
  if not is_file_buffer(bufnr) then
    detach(bufnr)
    return
  end
  local topic, path = topic_of(bufnr)
  local buf = buffers[bufnr]
  if buf and buf.topic == topic then
    -- Read again (:edit!): reading resets 'readonly'.
    apply(bufnr)
    return
  end
  detach(bufnr)
  if not topic then
    return
  end
  buffers[bufnr] = { topic = topic }
  local entry = entries[topic]
  if entry then
    entry.bufs[bufnr] = true
    apply(bufnr)
    return
  end
  entry = {
    topic = topic,
    key = key_of(bufnr),
    meta = meta_of(bufnr, path),
    bufs = { [bufnr] = true },
    status = 'joining',
    metas = {},
  }
  entries[topic] = entry
  join(entry)
  if wait and config.join_wait_ms > 0 and not link.slow then
    local answered = vim.wait(config.join_wait_ms, function()
      return entry.status ~= 'joining'
    end, 5)
    if not answered and entry.status == 'joining' then
      link.slow = true
    end
  end
end

-- A buffer was unloaded (:bunload, or :edit of another file without
-- 'hidden'): it is no longer open, so it leaves its topic. Looked at later,
-- since :edit! unloads a buffer only to read it again at once.
local function unloaded(bufnr)
  if not buffers[bufnr] then
    return
  end
  vim.schedule(function()
    if buffers[bufnr] and not vim.api.nvim_buf_is_loaded(bufnr) then
      detach(bufnr)
    end
  end)
end

-- Leaves every topic and waits a little for the daemon to confirm, so the
-- next in line is promoted by a clean `untrack`.
local function leave_all()
  link.generation = link.generation + 1
  stop_retrying()
  local conn = link.conn
  for _, entry in pairs(entries) do
    if conn and entry.ref then
      conn:request({ op = 'untrack', topic = entry.topic, ref = entry.ref })
    end
  end
  entries, buffers, by_ref, orphans = {}, {}, {}, {}
  link.state, link.conn, link.outage = 'idle', nil, nil
  if conn and conn.open then
    vim.wait(config.leave_wait_ms, function()
      return not conn:has_pending()
    end, 5)
    conn:close()
  end
end

-- Public API ------------------------------------------------------------

-- What the plugin knows of a buffer (default: the current one), or nil for
-- a buffer it does not follow.
function M.state(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local buf = buffers[bufnr]
  local entry = buf and entries[buf.topic]
  if not entry then
    return nil
  end
  local standing = entry.standing or {}
  local position = standing.position
  if entry.status == 'joined' and entry.seq and next(entry.metas) then
    -- Role events are not sent when someone ahead in the queue leaves,
    -- so count the entries ahead from the subscription instead.
    position = 0
    for _, meta in pairs(entry.metas) do
      if meta.seq < entry.seq then
        position = position + 1
      end
    end
  end
  return {
    topic = entry.topic,
    key = entry.key,
    status = entry.status,
    role = entry.status == 'joined' and standing.role or nil,
    position = entry.status == 'joined' and position or nil,
    owner = (entry.status == 'joined' and not is_null(standing.owner)) and standing.owner or nil,
    ref = entry.ref,
    error = entry.status == 'refused' and entry.error or link.error,
    connection = link.reconnecting and 'reconnecting' or link.state,
    socket = M.socket_path(),
    restricted = buf.saved ~= nil,
  }
end

-- A short text for the statusline: `owner`, `owner, 2 watching`,
-- `spectator #1 (owner: alice, pid 4242)`, or '' for buffers not followed.
function M.status(bufnr)
  local state = M.state(bufnr)
  if not state then
    return ''
  end
  local text
  if state.status == 'joined' then
    if state.role == 'owner' then
      local watching = #queue_of(entries[state.topic]) - 1
      text = watching > 0 and ('owner, %d watching'):format(watching) or 'owner'
    else
      local owner = state.owner or {}
      text = ('spectator #%d (owner: %s, pid %s)'):format(state.position or 0, owner.key, owner.pid)
    end
  elseif state.status == 'joining' then
    text = 'joining'
  elseif state.status == 'unreachable' then
    text = 'no daemon'
  else
    text = 'not tracked'
  end
  if state.connection == 'reconnecting' then
    text = text .. ', reconnecting'
  end
  return text
end

-- Who is on the buffer's topic, owner first:
-- { {key, pid, user, editor, role = 'owner'|'spectator', position, you}, ... }
function M.who(bufnr)
  local state = M.state(bufnr)
  if not state then
    return {}
  end
  local list = {}
  for position, meta in ipairs(queue_of(entries[state.topic])) do
    table.insert(list, {
      key = meta.key,
      pid = meta.pid,
      user = meta.user,
      editor = meta.editor,
      role = position == 1 and 'owner' or 'spectator',
      position = position - 1,
      you = meta.phx_ref == state.ref,
    })
  end
  return list
end

-- :PresenceStatus
function M.print_status()
  local bufnr = vim.api.nvim_get_current_buf()
  local state = M.state(bufnr)
  if not state then
    notify(('this buffer is not on any topic (daemon socket: %s, %s)'):format(M.socket_path(), link.state))
    return
  end
  local lines = {
    ('presenced: %s: %s'):format(display_name(bufnr), M.status(bufnr)),
    ('  topic %s, key %s, ref %s'):format(state.topic, state.key, state.ref or 'none'),
    ('  daemon %s: %s%s'):format(state.socket, state.connection, state.error and (' (' .. state.error .. ')') or ''),
  }
  vim.api.nvim_echo({ { table.concat(lines, '\n') } }, true, {})
end

-- :PresenceWho
function M.print_who()
  local bufnr = vim.api.nvim_get_current_buf()
  local state = M.state(bufnr)
  if not state then
    notify('this buffer is not on any topic')
    return
  end
  local list = M.who(bufnr)
  if #list == 0 then
    notify(('nobody known on %s yet (%s)'):format(state.topic, M.status(bufnr)))
    return
  end
  local lines = { ('presenced: on %s:'):format(state.topic) }
  for _, person in ipairs(list) do
    table.insert(lines, ('  %-12s %s (pid %s)%s%s'):format(
      person.role == 'owner' and 'owner' or ('spectator #' .. person.position),
      person.key,
      person.pid,
      person.editor and (', ' .. person.editor) or '',
      person.you and ', you' or ''
    ))
  end
  vim.api.nvim_echo({ { table.concat(lines, '\n') } }, true, {})
end

-- :PresenceReconnect: try the daemon again after it could not be reached.
function M.reconnect()
  connect()
end

-- Configures the plugin (see :help presenced-config) and follows every
-- loaded file buffer. May be called again to change the configuration.
function M.setup(options)
  options = options or {}
  vim.validate({ options = { options, 'table' } })
  config = vim.tbl_extend('force', vim.deepcopy(defaults), options)
  if config.on_unreachable ~= 'editable' and config.on_unreachable ~= 'readonly' then
    notify("on_unreachable must be 'editable' or 'readonly'; using 'editable'", levels.ERROR)
    config.on_unreachable = 'editable'
  end
  configured = true

  local group = vim.api.nvim_create_augroup('presenced', { clear = true })
  vim.api.nvim_create_autocmd({ 'BufReadPost', 'BufNewFile', 'BufFilePost' }, {
    group = group,
    desc = 'presenced: join the topic of a file buffer',
    callback = function(args)
      attach(args.buf, true)
    end,
  })
  vim.api.nvim_create_autocmd('BufWritePost', {
    group = group,
    desc = 'presenced: join the topic of a new buffer written to a file',
    callback = function(args)
      -- `:write NAME` names an unnamed buffer without BufFilePost.
      if not buffers[args.buf] then
        attach(args.buf, true)
      end
    end,
  })
  vim.api.nvim_create_autocmd({ 'BufDelete', 'BufWipeout' }, {
    group = group,
    desc = "presenced: leave a closed buffer's topic",
    callback = function(args)
      detach(args.buf)
    end,
  })
  vim.api.nvim_create_autocmd('BufUnload', {
    group = group,
    desc = "presenced: leave an unloaded buffer's topic",
    callback = function(args)
      unloaded(args.buf)
    end,
  })
  vim.api.nvim_create_autocmd('VimLeavePre', {
    group = group,
    desc = 'presenced: leave every topic',
    callback = leave_all,
  })

  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) then
      attach(bufnr, true)
    end
  end
end

-- Used by plugin/presenced.lua: the defaults, unless setup() was called.
function M.setup_once()
  if not configured then
    M.setup({})
  end
end

return M
