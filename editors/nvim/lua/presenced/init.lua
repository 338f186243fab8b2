-- presenced for Neovim: every normal file buffer joins a topic on the
-- presenced daemon. The first editor to join a topic owns it and may edit;
-- every later one is a spectator whose buffer is 'nomodifiable', and whose
-- writes to its file are refused, until it is promoted. See :help
-- presenced and docs/protocol.md.
--
-- State lives in three tables:
--   buffers[bufnr] = { topic, saved, last_message, file, read_at, ... }
--                             one per attached buffer; `file` is the
--                             file's mtime and size when the buffer last
--                             read or wrote it
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
  -- The daemon trouble last said, so the same is said once, not per buffer.
  told_trouble = nil,
  -- Set when a wait for a role ran out: later buffers do not wait again
  -- until the daemon answers, so opening many files at once blocks for
  -- at most one join_wait_ms.
  slow = false,
}

-- Helpers ---------------------------------------------------------------

-- Messages said before Neovim finished starting: the first redraw would
-- wipe them, so they wait for VimEnter.
local early_messages = {}

-- Says `message` so that it stays visible: never before the UI is up, and
-- after the command or event that caused it (an :edit's file message
-- would otherwise replace it). Also kept in :messages.
-- On a screen, a message wider than the command line would stop Neovim at
-- "Press ENTER", in the middle of opening a file: it is cut to fit, as the
-- Vim plugin does, and :PresenceStatus gives the whole story. Without a UI
-- (headless) nothing can stop, and it is said whole.
local function fit_to_screen(message)
  if #vim.api.nvim_list_uis() == 0 then
    return message
  end
  local width = vim.o.columns - 12
  if width > 3 and vim.fn.strdisplaywidth(message) > width then
    return vim.fn.strcharpart(message, 0, width - 3) .. '...'
  end
  return message
end

local function notify(message, level)
  message = 'presenced: ' .. message
  level = level or levels.INFO
  if vim.v.vim_did_enter ~= 1 then
    table.insert(early_messages, { message, level })
    return
  end
  vim.schedule(function()
    vim.notify(fit_to_screen(message), level)
  end)
end

local function say_early_messages()
  local waiting = early_messages
  early_messages = {}
  vim.schedule(function()
    for _, said in ipairs(waiting) do
      vim.notify(fit_to_screen(said[1]), said[2])
    end
  end)
end

-- Milliseconds since the Unix epoch.
local function now_ms()
  local seconds, microseconds = uv.gettimeofday()
  return seconds * 1000 + math.floor(microseconds / 1000)
end

-- `10:14`: a daemon time (Unix milliseconds) in local time.
local function clock(ms)
  return os.date('%H:%M', math.floor(ms / 1000))
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

-- The most symbolic links followed in a row, as the kernel does (ELOOP).
local max_links = 40

-- The absolute path with symbolic links resolved; for a file that does
-- not exist yet, its folder's resolved path and its name. A link to a
-- file not written yet is followed first: a write through it creates the
-- target, so the target's path is the topic before and after that write.
local function resolve_path(name)
  local full = vim.fn.fnamemodify(name, ':p')
  local real = uv.fs_realpath(full)
  if real then
    return real
  end
  local missing = full
  for _ = 1, max_links do
    local target = uv.fs_readlink(missing)
    if not target then
      break
    end
    -- A relative target is taken from its link's folder.
    missing = target:sub(1, 1) == '/' and target or vim.fn.fnamemodify(missing, ':h') .. '/' .. target
  end
  if uv.fs_readlink(missing) then
    return full -- links that never end: nothing can be written there
  end
  local folder = uv.fs_realpath(vim.fn.fnamemodify(missing, ':h'))
  if not folder then
    return full
  end
  local tail = vim.fn.fnamemodify(missing, ':t')
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
    -- The owner of a topic shared across hosts, held back while its daemon
    -- cannot reach etcd: role 'spectator' (so read-only), position 0.
    suspended = fields.suspended == true,
  }
end

-- What a suspended owner is told.
local SUSPENDED = "suspended: the shared topic's etcd cannot be reached"

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

-- Whether `a` and `b` (metas, or the `owner` the daemon names) are one
-- entry. Not by ref: an update (every save sends one) gives the entry a
-- new ref, and no role event tells a spectator its owner's new one. The
-- key, the process and the time it joined are what an update keeps.
local function same_entry(a, b)
  return type(a) == 'table'
    and type(b) == 'table'
    and a.key ~= nil
    and a.key == b.key
    and a.pid == b.pid
    and a.joined_at == b.joined_at
end

-- The entries on the topic in the order they joined, for display only:
-- who owns the topic and where each one stands is the daemon's to say.
local function in_join_order(entry)
  local list = {}
  for _, meta in pairs(entry.metas or {}) do
    table.insert(list, meta)
  end
  table.sort(list, function(a, b)
    return a.seq < b.seq
  end)
  return list
end

-- How many entries the subscription shows on the topic.
local function count_metas(entry)
  local count = 0
  for _ in pairs(entry.metas or {}) do
    count = count + 1
  end
  return count
end

-- The `saved_at` of a meta, or nil: a number only when some editor saved.
local function saved_at_of(meta)
  local at = type(meta) == 'table' and meta.saved_at or nil
  return type(at) == 'number' and at or nil
end

-- Remembers the latest save by another editor on the topic, to say who
-- changed the file when this one is promoted: the owner's meta is gone
-- from the subscription by the time the role event comes.
local function note_save(entry, meta)
  local at = saved_at_of(meta)
  if at and meta.phx_ref ~= entry.ref and (not entry.last_save or at > entry.last_save.at) then
    entry.last_save = { key = meta.key, at = at }
  end
end

-- The topic's owner as the daemon last named it: in the entry's standing
-- while it is joined, else in the subscription's latest state or diff
-- (for an entry that was removed, whoever was promoted when it went).
-- nil when none is known, or when the one named is this entry itself.
local function current_owner(entry)
  if entry.status == 'joined' and entry.standing and not is_null(entry.standing.owner) then
    return entry.standing.owner
  end
  local owner = entry.topic_owner
  local gone_ref = type(entry.removal) == 'table' and entry.removal.ref or nil
  if entry.status == 'removed' and type(owner) == 'table' and owner.phx_ref ~= gone_ref then
    return owner
  end
  return nil
end

-- `removed by root (uid 0, pid 8120)`: who took the entry away.
local function removed_by(entry)
  local by = entry.removal and type(entry.removal.by) == 'table' and entry.removal.by or {}
  local function field(value)
    return value == nil and '?' or tostring(value)
  end
  return ('removed by %s (uid %s, pid %s)'):format(field(by.user), field(by.uid), field(by.pid))
end

-- Whether this editor must not write the buffer to its file: it is a
-- spectator, or its entry was taken away.
local function is_guarded(entry)
  return entry.status == 'removed' or (entry.status == 'joined' and entry.standing.role ~= 'owner')
end

-- Buffer options --------------------------------------------------------

-- Makes the buffer read-only for a spectator: 'nomodifiable', so it cannot
-- be changed, but not 'readonly': with 'readonly' a plain :w stops at the
-- editor's own E45 ("add ! to override") before any write autocommand
-- runs, so the write guard could never say who owns the file. The user's
-- own settings are remembered the first time, to give them back on
-- promotion.
local function restrict(bufnr)
  local buf = buffers[bufnr]
  if not buf.saved then
    buf.saved = { modifiable = vim.bo[bufnr].modifiable, readonly = vim.bo[bufnr].readonly }
  end
  -- Set every time: reading the file again (:edit!, or the read after the
  -- swap-file choice 'o') may set 'readonly' again.
  vim.bo[bufnr].modifiable = false
  vim.bo[bufnr].readonly = false
end

-- Gives the user's settings back; true if the buffer was restricted. A
-- buffer this plugin opened read-only at the swap-file question becomes
-- writable: the swap file was the owner's.
local function unrestrict(bufnr)
  local buf = buffers[bufnr]
  if not buf or not buf.saved then
    return false
  end
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.bo[bufnr].modifiable = buf.saved.modifiable
    vim.bo[bufnr].readonly = buf.saved.readonly and not buf.swap_readonly
  end
  buf.saved = nil
  buf.swap_readonly = nil
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

-- The buffer's file as it was when the buffer last read or wrote it.
local function file_stamp(bufnr)
  local stat = uv.fs_stat(vim.api.nvim_buf_get_name(bufnr))
  if not stat then
    return nil
  end
  return { sec = stat.mtime.sec, nsec = stat.mtime.nsec, size = stat.size }
end

local function remember_file(bufnr)
  local buf = buffers[bufnr]
  if buf then
    buf.file = file_stamp(bufnr)
    buf.read_at = now_ms()
  end
end

-- Whether the file changed on disk since the buffer read or wrote it. A
-- file that is gone is not something to reload.
local function file_changed(bufnr)
  local now, was = file_stamp(bufnr), buffers[bufnr].file
  if not now then
    return false
  end
  return not was or now.sec ~= was.sec or now.nsec ~= was.nsec or now.size ~= was.size
end

-- Reads the buffer's file again when it changed on disk since the buffer
-- read it, keeping the view of every window on it. Returns 'unchanged',
-- 'reloaded', 'modified' (the buffer has changes of its own: it is left
-- as it is) or 'failed' and why.
local function reload(bufnr)
  if not file_changed(bufnr) then
    return 'unchanged'
  end
  if vim.bo[bufnr].modified then
    return 'modified'
  end
  local buf = buffers[bufnr]
  local views = {}
  for _, win in ipairs(vim.fn.win_findbuf(bufnr)) do
    views[win] = vim.api.nvim_win_call(win, vim.fn.winsaveview)
  end
  -- Reading it again runs BufReadPost, which applies the standing again:
  -- that must not say the standing again.
  local said = buf.last_message
  buf.reloading = true
  local ok, err = pcall(vim.api.nvim_buf_call, bufnr, function()
    vim.cmd('silent edit!')
  end)
  buf.reloading = false
  buf.last_message = said
  for win, view in pairs(views) do
    if vim.api.nvim_win_is_valid(win) and vim.api.nvim_win_get_buf(win) == bufnr then
      vim.api.nvim_win_call(win, function()
        vim.fn.winrestview(view)
      end)
    end
  end
  if not ok then
    return 'failed', tostring(err)
  end
  return 'reloaded'
end

-- Promoted: reads the file again if the last owner (or anyone) changed it
-- while this buffer was a spectator, and says what happened.
local function promoted(bufnr, entry)
  local buf = buffers[bufnr]
  local name = display_name(bufnr)
  local save = entry.last_save
  if save and save.at < (buf.read_at or 0) then
    -- Saved before this buffer read the file: not what changed it.
    save = nil
  end
  local outcome, err = reload(bufnr)
  local message, level = nil, levels.INFO
  if outcome == 'reloaded' and save then
    message = ('you own %s now; reloaded: %s saved it at %s'):format(name, save.key, clock(save.at))
  elseif outcome == 'reloaded' then
    message = ('you own %s now; reloaded: it changed on disk'):format(name)
  elseif outcome == 'modified' then
    message = ('you own %s now; editable, but it changed on disk and this copy has changes of its own, so it was not reloaded (:edit! takes the file)'):format(name)
    level = levels.WARN
  elseif outcome == 'failed' then
    message = ('you own %s now; editable, but reading it again failed: %s'):format(name, err)
    level = levels.WARN
  else
    message = ('you own %s now; editable again'):format(name)
  end
  buf.last_message = message
  notify(message, level)
end

-- A spectator follows the owner's save: reads the file again and says so.
local function follow_save(bufnr, save)
  local name = display_name(bufnr)
  local saved = ('%s saved it at %s'):format(save.key, clock(save.at))
  local outcome, err = reload(bufnr)
  if outcome == 'reloaded' then
    notify(('%s: reloaded: %s'):format(name, saved))
  elseif outcome == 'modified' then
    notify(('%s: %s; not reloaded: this copy has changes of its own'):format(name, saved), levels.WARN)
  elseif outcome == 'failed' then
    notify(('%s: %s; reading it again failed: %s'):format(name, saved, err), levels.WARN)
  end
end

-- Says why the daemon cannot be reached, once per reason, whichever
-- buffer comes first: the same trouble for every buffer is news once.
local function tell_trouble(bufnr, message)
  if link.told_trouble == message then
    buffers[bufnr].last_message = display_name(bufnr) .. ': ' .. message
    return
  end
  link.told_trouble = message
  tell(bufnr, message, levels.WARN)
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
        promoted(bufnr, entry)
      else
        buf.last_message = nil
      end
    else
      local modified = vim.bo[bufnr].modified
      restrict(bufnr)
      local message = who(standing.owner) .. ' is editing; read-only'
      if standing.suspended then
        message = SUSPENDED .. '; read-only until it returns'
      end
      if modified then
        message = message .. ' (your unsaved changes are kept)'
      end
      tell(bufnr, message, levels.WARN)
    end
  elseif entry.status == 'removed' then
    restrict(bufnr)
    tell(bufnr, removed_by(entry) .. '; read-only. :PresenceJoin to queue again', levels.WARN)
  elseif entry.status == 'unreachable' then
    local reason = ('cannot reach the daemon at %s (%s)'):format(M.socket_path(), link.error or 'no answer')
    if config.on_unreachable == 'readonly' then
      restrict(bufnr)
      tell_trouble(bufnr, reason .. '; read-only until it answers')
    else
      unrestrict(bufnr)
      tell_trouble(bufnr, reason .. '; editable, but nobody else will know you are editing it')
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

local function on_presence_event(message)
  local entry = entries[message.topic]
  if not entry then
    return
  end
  -- Who owns the topic, as the daemon says after this event.
  entry.topic_owner = type(message.owner) == 'table' and message.owner or nil
  -- The same owner as the standing's, by its latest ref: the owner's
  -- saves change its ref, and no role event says so.
  if entry.standing and same_entry(entry.standing.owner, entry.topic_owner) then
    entry.standing.owner = entry.topic_owner
  end
  if message.event == 'presence_state' then
    -- A state replaces the whole view, even one not asked for (section 14).
    entry.metas = {}
    add_metas(entry.metas, message.payload)
    for _, meta in pairs(entry.metas) do
      note_save(entry, meta)
    end
    return
  end
  local payload = message.payload or {}
  local reasons = type(message.reasons) == 'table' and message.reasons or {}
  -- What the metas that leave said, to see what an update changed.
  local before = {}
  if type(payload.leaves) == 'table' then
    for _, presence in pairs(payload.leaves) do
      for _, meta in ipairs(presence.metas or {}) do
        before[meta.phx_ref] = entry.metas[meta.phx_ref] or meta
        entry.metas[meta.phx_ref] = nil
      end
    end
  end
  local joined = {}
  add_metas(joined, payload.joins)
  local followed
  for ref, meta in pairs(joined) do
    entry.metas[ref] = meta
    note_save(entry, meta)
    local prev = meta.phx_ref_prev
    -- Another editor wrote the file: the owner saving, or a spectator
    -- overriding (:PresenceWrite! and the like in other editors). This
    -- editor's own update may come before the reply that gives its new ref.
    local at = saved_at_of(meta)
    if
      at
      and not is_null(prev)
      and reasons[prev] == 'update'
      and ref ~= entry.ref
      and prev ~= entry.ref
      and saved_at_of(before[prev]) ~= at
      and (not followed or at > followed.at)
    then
      followed = { key = meta.key, at = at }
    end
  end
  -- Someone else wrote the file: a spectator reads the current text. The
  -- owner is left alone: it is the one editing, and Neovim's own check
  -- warns it at its next write that the file changed since it read it.
  if followed and is_guarded(entry) then
    for bufnr in pairs(entry.bufs) do
      follow_save(bufnr, followed)
    end
  end
end

-- Talking to the daemon -------------------------------------------------

local connect -- defined below; tracking may need to connect first
local removed -- defined below; restore() and the events use it
local send_meta -- defined below; a track whose meta changed meanwhile sends it

local function track(entry)
  local conn = link.conn
  local sent_meta = entry.meta
  entry.tracking = true
  conn:request({
    op = 'track',
    topic = entry.topic,
    key = entry.key,
    meta = sent_meta,
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
      -- The track carried the whole meta, unless it changed meanwhile (a
      -- write or an override while the track was on its way).
      entry.meta_unsent = entry.meta ~= sent_meta
      by_ref[reply.ref] = entry
      set_standing(entry, standing_of(reply))
      if entry.meta_unsent then
        send_meta(entry)
      end
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

-- Sends what leave() decided once no update of the entry is on its way.
local function finish_leaving(entry)
  if entry.ref then
    by_ref[entry.ref] = nil
  end
  if link.state == 'up' and (entry.ref or entry.status == 'removed') then
    if entry.ref then
      link.conn:request({ op = 'untrack', topic = entry.topic, ref = entry.ref })
    end
    if not entries[entry.topic] then
      link.conn:request({ op = 'unsubscribe', topic = entry.topic })
    end
  elseif entry.token then
    table.insert(orphans, { token = entry.token, ref = entry.ref, topic = entry.topic })
  end
end

local function leave(entry)
  entry.left = true
  -- An update on its way gives the entry a new ref, and the old one would
  -- untrack nothing: its reply finishes the leave (send_meta).
  if not entry.updating then
    finish_leaving(entry)
  end
  -- A track still on its way is untracked when its reply comes.
end

-- The entry has a new ref (an update of it): events name it from now on.
local function rekey(entry, ref)
  if entry.ref and by_ref[entry.ref] == entry then
    by_ref[entry.ref] = nil
  end
  entry.ref = ref
  if not entry.left then
    by_ref[ref] = entry
  end
end

-- The meta fields this plugin keeps itself (a save, an override), as
-- opposed to the ones the entry started with.
local own_meta_fields = { 'saved_at', 'saves', 'overrode' }

-- Sends the entry's meta with `update` (which gives the entry a new ref,
-- taken from the reply). Without a connection or a place it is sent after
-- the next resume, or carried by the next track. `done(ok)` runs once the
-- daemon answered, or at once if nothing was sent.
send_meta = function(entry, done)
  local conn = link.conn
  if link.state ~= 'up' or not entry.ref or entry.tracking or entry.updating then
    entry.meta_unsent = true
    if done then
      done(false)
    end
    return
  end
  entry.meta_unsent = false
  entry.updating = true
  local sent_ref, sent_meta = entry.ref, entry.meta
  conn:request({ op = 'update', topic = entry.topic, ref = sent_ref, meta = sent_meta }, function(reply)
    entry.updating = false
    local lost = false
    if reply.ok then
      rekey(entry, reply.ref)
    elseif reply.error.code == 'disconnected' then
      entry.meta_unsent = true
    elseif entry.ref and entry.ref ~= sent_ref then
      -- Someone (root) updated the entry while this update was on its
      -- way: the `updated` event, which came first, gave it a new ref and
      -- that one's meta, and this update found no entry by the old ref.
      -- What this editor had to say (the save, the override) still holds:
      -- say it again on top of the new meta.
      lost = true
      local kept = {}
      for _, field in ipairs(own_meta_fields) do
        kept[field] = sent_meta[field]
      end
      entry.meta = vim.tbl_extend('force', entry.meta, kept)
      entry.meta_unsent = true
    end
    if entry.left then
      finish_leaving(entry)
    elseif entry.meta_unsent and link.conn == conn and conn.open then
      -- A write while this one was on its way changed the meta again, or
      -- this one was lost: the answer to the next one is the one awaited.
      if lost then
        send_meta(entry, done)
        return
      end
      send_meta(entry)
    end
    if done then
      done(reply.ok)
    end
  end)
end

-- Starts a daemon through the CLI, which waits until it serves the socket.
local function start_daemon(path, callback)
  local stderr = {}
  -- One argument, so a path starting with '-' is never read as a flag.
  local command = { config.presence_cmd, '--socket=' .. path, 'list', '--json' }
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

-- Someone took the entry away (`removed` event, or the `removed` part of
-- a resume reply): it has no place and no token any more; the buffer is
-- read-only until :PresenceJoin queues it again.
removed = function(entry, removal)
  if entry.ref and by_ref[entry.ref] == entry then
    by_ref[entry.ref] = nil
  end
  entry.ref, entry.token = nil, nil
  entry.tracking = false
  entry.status = 'removed'
  entry.removal = removal
  apply_entry(entry)
end

-- Tracks every entry that has no place yet: new ones, ones that expired
-- while away, and ones that could not be tracked before.
local function track_unjoined(conn)
  for _, entry in pairs(entries) do
    if conn ~= link.conn then
      return
    end
    -- A removed entry is not tracked again unless the user asks
    -- (:PresenceJoin): someone took its place away on purpose.
    if not entry.ref and not entry.tracking and entry.status ~= 'removed' then
      entry.status = 'joining'
      track(entry)
    end
  end
end

-- Gets back everything after a (re)connect, as docs/protocol.md section 13
-- says: resume every token, take the standings it gives, track again what
-- the daemon no longer has, and subscribe again.
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
    -- An entry updated while no connection held it has a new ref, which
    -- `roles` and later events name.
    for token, ref in pairs(type(reply.refs) == 'table' and reply.refs or {}) do
      local entry = owner_of_token[token]
      if entry and entries[entry.topic] == entry and entry.ref ~= ref then
        rekey(entry, ref)
      end
    end
    for ref, standing in pairs(is_null(reply.roles) and {} or reply.roles) do
      local entry = by_ref[ref]
      if entry then
        -- Unchanged roles say nothing: apply() only speaks of changes.
        set_standing(entry, standing_of(standing))
        conn:request({ op = 'subscribe', topic = entry.topic })
        if entry.meta_unsent then
          -- Written while the daemon was away.
          send_meta(entry)
        end
      end
    end
    -- Taken away while this editor was away: as if `removed` had come.
    for token, removal in pairs(type(reply.removed) == 'table' and reply.removed or {}) do
      local entry = owner_of_token[token]
      if entry and entries[entry.topic] == entry then
        removed(entry, removal)
        conn:request({ op = 'subscribe', topic = entry.topic })
      end
    end
    for _, orphan in ipairs(leaving) do
      -- `refs` has the ref it has now: an update whose reply was lost, or
      -- one by root, gave it a new one.
      local ref = type(reply.refs) == 'table' and reply.refs[orphan.token] or orphan.ref
      if ref and vim.tbl_contains(reply.resumed or {}, ref) then
        conn:request({ op = 'untrack', topic = orphan.topic, ref = ref })
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
  link.told_trouble = nil
  link.reconnecting = false
  -- Whatever restore() sends (perhaps nothing), this gets an answer from a
  -- daemon that really serves us, which ends the outage (conn.answered).
  conn:request({ op = 'ping' })
  restore(conn)
end

-- The daemon cannot be reached: every entry without a connection falls
-- back to `on_unreachable`. A later buffer, or :PresenceReconnect, tries
-- again. A removed entry stays removed: someone took its place away on
-- purpose, so it neither becomes editable nor is tracked again when the
-- daemon answers, until :PresenceJoin.
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
    if entry.status ~= 'removed' then
      entry.status = 'unreachable'
      apply_entry(entry)
    end
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
  elseif message.event == 'removed' or message.event == 'updated' then
    -- One entry per topic and key on this connection: the ref names it,
    -- and so do the topic and key.
    local payload = type(message.payload) == 'table' and message.payload or {}
    local entry = by_ref[payload.ref] or by_ref[payload.prev_ref]
    if not entry then
      local candidate = entries[message.topic]
      if candidate and candidate.key == payload.key and candidate.ref then
        entry = candidate
      end
    end
    if not entry then
      return
    end
    if message.event == 'removed' then
      removed(entry, payload)
    else
      -- Someone with the right (root) changed the meta: the new ref and
      -- meta are this entry's from now on.
      rekey(entry, payload.ref)
      if type(payload.meta) == 'table' then
        entry.meta = payload.meta
      end
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
    -- Read again (:edit!): reading may set 'readonly' again.
    remember_file(bufnr)
    apply(bufnr)
    return
  end
  detach(bufnr)
  if not topic then
    return
  end
  buffers[bufnr] = { topic = topic }
  remember_file(bufnr)
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
  if conn and conn.open then
    -- An update on its way (`:wq` sends one) gives its entry a new ref:
    -- untrack by the ref it ends with.
    vim.wait(config.leave_wait_ms, function()
      return not conn:has_pending()
    end, 5)
  end
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

-- Whether `file` (as a write names it) is the buffer's own file, links
-- resolved: a write anywhere else is the user's business.
local function is_own_file(bufnr, file)
  return resolve_path(file) == resolve_path(vim.api.nvim_buf_get_name(bufnr))
end

-- After a write of a followed buffer to its own file: an owner's save, or
-- an override (:PresenceWrite!, the only write a non-owner makes), goes
-- into its meta (`saved_at`, `saves`), for spectators to follow.
local function written(bufnr, file)
  local buf = buffers[bufnr]
  if not buf or not is_own_file(bufnr, file) then
    return
  end
  remember_file(bufnr)
  local entry = entries[buf.topic]
  if not entry then
    return
  end
  local owns = entry.status == 'joined' and entry.standing.role == 'owner'
  if not owns and not buf.overriding then
    return
  end
  entry.saves = (entry.saves or 0) + 1
  entry.meta = vim.tbl_extend('force', entry.meta, { saved_at = now_ms(), saves = entry.saves })
  send_meta(entry)
end

-- SwapExists: learn the file's role first (joining now, waiting as at
-- open). Another editor owns it: open it read-only without the question,
-- and let the spectator message say why. This editor owns it (or the
-- daemon cannot say): Vim's question stays, since recovering a crashed
-- session is real. Reading the file again to follow a save keeps the
-- copy as it is, without asking again.
local function swap_exists(bufnr)
  local buf = buffers[bufnr]
  if not buf then
    attach(bufnr, true)
    buf = buffers[bufnr]
  end
  local entry = buf and entries[buf.topic]
  if not entry then
    return
  end
  if is_guarded(entry) then
    vim.v.swapchoice = 'o'
    buf.swap_readonly = true
  elseif buf.reloading then
    -- Promoted after an owner that died: its swap file stays for
    -- :recover, and this copy carries on.
    vim.v.swapchoice = 'e'
    notify(
      ('%s: a swap file of another session exists (%s); :recover it if its changes matter'):format(display_name(bufnr), vim.v.swapname),
      levels.WARN
    )
  end
end

-- Public API ------------------------------------------------------------

-- Asks `question`, true for yes. Replace it to answer for the user (as the
-- tests do): require('presenced').confirm = function(question) ... end.
function M.confirm(question)
  return vim.fn.confirm(question, '&Yes\n&No', 2, 'Warning') == 1
end

-- Whether writes of the buffer to its own file are refused: another
-- editor holds the file (the buffer is a spectator's, or its entry was
-- removed), or this plugin made the buffer read-only for another reason
-- (the daemon cannot be reached and on_unreachable is 'readonly', or the
-- buffer is queueing again after a removal).
local function guards_writes(bufnr, entry)
  return is_guarded(entry) or buffers[bufnr].saved ~= nil
end

-- The owner a spectator waits for; for a removed entry, the owner the
-- daemon last named to the subscription (someone was promoted when it
-- went), as the other plugins name it. nil when no owner is known: the
-- daemon cannot be reached, or the entry is joining.
local function known_owner(entry)
  -- A suspended owner is named owner, but it is this editor: nobody else
  -- holds the file.
  if
    entry.status == 'joined'
    and entry.standing.role ~= 'owner'
    and not entry.standing.suspended
    and type(entry.standing.owner) == 'table'
  then
    return entry.standing.owner
  end
  if entry.status == 'removed' then
    return current_owner(entry)
  end
  return nil
end

-- The refusal of a guarded buffer's write, or nil when the write may go on.
local function refusal(bufnr, file)
  local buf = buffers[bufnr]
  local entry = buf and entries[buf.topic]
  if not entry or buf.overriding or not guards_writes(bufnr, entry) or not is_own_file(bufnr, file) then
    return nil
  end
  local name = display_name(bufnr)
  local what_to_do = ':PresenceWrite! to save anyway, or :w other-name'
  if entry.status == 'removed' then
    return ('presenced: %s: %s; your copy is read-only. :PresenceJoin to queue again, %s'):format(
      name,
      removed_by(entry),
      what_to_do
    )
  end
  if entry.status == 'joined' and entry.standing.suspended then
    return ('presenced: %s: %s, so your copy is read-only until it returns. %s'):format(name, SUSPENDED, what_to_do)
  end
  local owner = known_owner(entry)
  if not owner then
    return ('presenced: %s: the daemon cannot say who is editing it, so your copy is read-only until it answers. %s'):format(
      name,
      what_to_do
    )
  end
  local since = type(owner.joined_at) == 'number' and clock(owner.joined_at) or '?'
  return ('presenced: %s is being edited by %s since %s; your copy is read-only. %s'):format(
    name,
    who(owner),
    since,
    what_to_do
  )
end

-- Called by the BufWritePre, FileWritePre and FileAppendPre autocommand
-- with <abuf> and <afile>: an Ex command for it to `execute`, '' to let the
-- write go on. A refused write shows the refusal as an error (also in
-- v:errmsg) and `call interrupt()`, which stops the write whatever the
-- command (`:w!`, `:wq`, `:saveas!`) and keeps `:wq` and `:x` from
-- quitting, without the "E605: Exception not caught" a :throw would print
-- around the message; a Lua error or an :echoerr would not stop it. In a
-- script's :try the refusal is caught as "Vim:Interrupt".
function M.write_guard(abuf, afile)
  local bufnr = tonumber(abuf)
  local why = bufnr and refusal(bufnr, afile)
  if not why then
    return ''
  end
  vim.api.nvim_echo({ { why, 'ErrorMsg' } }, true, {})
  vim.v.errmsg = why
  return 'call interrupt()'
end

-- :PresenceWrite[!]: writes a guarded buffer's copy over its file, after
-- a confirmation, and the entry's meta says so (`overrode`), which
-- `presence log` shows as an update by this editor. Once written, the
-- write is recorded as a save (`written`), so the other spectators read it.
function M.write_anyway(bang)
  local bufnr = vim.api.nvim_get_current_buf()
  local buf = buffers[bufnr]
  local entry = buf and entries[buf.topic]
  local name = display_name(bufnr)
  if not entry or not guards_writes(bufnr, entry) then
    -- Nothing to override: an ordinary write.
    vim.cmd(bang and 'write!' or 'write')
    return
  end
  local owner = known_owner(entry)
  if not bang then
    vim.api.nvim_err_writeln(
      owner
          and ('presenced: %s is being edited by %s; :PresenceWrite! (with !) writes your copy over theirs'):format(name, who(owner))
        or ('presenced: nobody is known to own %s now; :PresenceWrite! (with !) writes your copy over the file'):format(name)
    )
    return
  end
  local question = owner and ('presenced: %s is editing %s. Write your copy over it anyway?'):format(who(owner), name)
    or ('presenced: nobody is known to own %s now. Write your copy over it anyway?'):format(name)
  if not M.confirm(question) then
    notify(name .. ': not written')
    return
  end
  -- Logged before the write, so the log has it even if the write fails.
  -- Without a connection or a place, the meta goes to the daemon after the
  -- resume, or with the next track (:PresenceJoin).
  vim.wait(config.leave_wait_ms, function()
    return not entry.updating
  end, 5)
  local overrode = { at = now_ms() }
  if owner then
    overrode.owner, overrode.owner_pid = owner.key, owner.pid
  end
  entry.meta = vim.tbl_extend('force', entry.meta, { overrode = overrode })
  if link.state == 'up' and entry.ref and not entry.tracking then
    local answered, logged = false, false
    send_meta(entry, function(ok)
      answered, logged = true, ok
    end)
    vim.wait(config.join_wait_ms, function()
      return answered
    end, 5)
    if not logged then
      notify(name .. ': the daemon did not record this override', levels.WARN)
    end
  else
    send_meta(entry)
  end
  buf.overriding = true
  local ok, err = pcall(vim.api.nvim_buf_call, bufnr, function()
    vim.cmd('write!')
  end)
  buf.overriding = false
  -- The buffer stays as guarded as it was (unless promoted meanwhile).
  if guards_writes(bufnr, entry) then
    restrict(bufnr)
  end
  if not ok then
    vim.api.nvim_err_writeln('presenced: ' .. name .. ': not written: ' .. tostring(err))
    return
  end
  notify(
    ('%s: written over %s; still read-only'):format(name, owner and ("the copy of " .. who(owner)) or 'the file'),
    levels.WARN
  )
end

-- :PresenceJoin: queue again (at the end) after the entry was removed, the
-- daemon refused it, or could not be reached.
function M.join_again()
  local bufnr = vim.api.nvim_get_current_buf()
  local buf = buffers[bufnr]
  local entry = buf and entries[buf.topic]
  if not entry then
    if is_file_buffer(bufnr) then
      attach(bufnr, true)
    else
      notify('this buffer is not a file to follow')
    end
    return
  end
  if entry.status == 'joined' or entry.status == 'joining' then
    notify(display_name(bufnr) .. ': already on ' .. entry.topic .. ' (' .. M.status(bufnr) .. ')')
    return
  end
  entry.removal, entry.error = nil, nil
  for other in pairs(entry.bufs) do
    buffers[other].last_message = nil
  end
  join(entry)
end

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
  return {
    topic = entry.topic,
    key = entry.key,
    status = entry.status,
    role = entry.status == 'joined' and standing.role or nil,
    -- As the daemon last said: it sends a role event whenever it changes.
    position = entry.status == 'joined' and standing.position or nil,
    -- The owner, held back while the daemon cannot reach etcd.
    suspended = entry.status == 'joined' and standing.suspended or false,
    owner = current_owner(entry),
    ref = entry.ref,
    error = entry.status == 'refused' and entry.error or link.error,
    connection = link.reconnecting and 'reconnecting' or link.state,
    socket = M.socket_path(),
    restricted = buf.saved ~= nil,
  }
end

-- A short text for the statusline: `owner`, `owner, 2 watching`,
-- `spectator #1 (owner: alice, pid 4242)`, `suspended (etcd unreachable)`,
-- or '' for buffers not followed.
function M.status(bufnr)
  local state = M.state(bufnr)
  if not state then
    return ''
  end
  local text
  if state.status == 'joined' then
    if state.role == 'owner' then
      local watching = count_metas(entries[state.topic]) - 1
      text = watching > 0 and ('owner, %d watching'):format(watching) or 'owner'
    elseif state.suspended then
      text = 'suspended (etcd unreachable)'
    else
      local owner = state.owner or {}
      text = ('spectator #%d (owner: %s, pid %s)'):format(state.position or 0, owner.key, owner.pid)
    end
  elseif state.status == 'joining' then
    text = 'joining'
  elseif state.status == 'unreachable' then
    text = 'no daemon'
  elseif state.status == 'removed' then
    text = 'removed (:PresenceJoin to queue again)'
  else
    text = 'not tracked'
  end
  if state.connection == 'reconnecting' then
    text = text .. ', reconnecting'
  end
  return text
end

-- Who is on the buffer's topic, in the order they joined:
-- { {key, pid, user, editor, role = 'owner'|'spectator', position, you, suspended}, ... }
-- The owner is the one the daemon names; `position` is known for the
-- owner (0) and for this editor (its standing), nil for the others. This
-- editor's entry, when it is the owner held back while the daemon cannot
-- reach etcd, is the owner with `suspended` true.
function M.who(bufnr)
  local state = M.state(bufnr)
  if not state then
    return {}
  end
  local entry = entries[state.topic]
  local owner = state.owner or entry.topic_owner
  local list = {}
  for _, meta in ipairs(in_join_order(entry)) do
    local you = meta.phx_ref == state.ref
    local owns
    if state.role == 'owner' then
      owns = you
    else
      owns = same_entry(meta, owner)
    end
    local position = nil
    if owns then
      position = 0
    elseif you then
      position = state.position
    end
    table.insert(list, {
      key = meta.key,
      pid = meta.pid,
      user = meta.user,
      editor = meta.editor,
      role = owns and 'owner' or 'spectator',
      position = position,
      you = you,
      suspended = you and state.suspended or nil,
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
      person.suspended and 'suspended'
        or person.role == 'owner' and 'owner'
        or (person.position and ('spectator #' .. person.position) or 'spectator'),
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
  vim.api.nvim_create_autocmd({ 'BufWritePre', 'FileWritePre', 'FileAppendPre' }, {
    group = group,
    desc = "presenced: refuse a spectator's write to its file",
    -- Ex commands, not a Lua callback: an error in a callback lets the
    -- write go on; interrupt() called from Ex commands stops it.
    command = "execute v:lua.require'presenced'.write_guard(expand('<abuf>'), expand('<afile>:p'))",
  })
  vim.api.nvim_create_autocmd('BufWritePost', {
    group = group,
    desc = "presenced: record a save (the owner's, or an override); join the topic of a new buffer written to a file",
    callback = function(args)
      -- `:write NAME` names an unnamed buffer without BufFilePost.
      if not buffers[args.buf] then
        attach(args.buf, true)
      else
        written(args.buf, vim.fn.fnamemodify(args.file, ':p'))
      end
    end,
  })
  vim.api.nvim_create_autocmd('SwapExists', {
    group = group,
    desc = 'presenced: answer the swap-file question for a spectator',
    callback = function(args)
      -- SwapExists has no <abuf>: the buffer is the one the file names.
      local bufnr = vim.fn.bufnr(vim.fn.fnamemodify(args.file, ':p'))
      swap_exists(bufnr > 0 and bufnr or vim.api.nvim_get_current_buf())
    end,
  })
  vim.api.nvim_create_autocmd('VimEnter', {
    group = group,
    desc = 'presenced: say what waited for the UI',
    callback = say_early_messages,
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
