-- One connection to the presenced daemon: newline-delimited JSON over its
-- Unix socket, through a libuv pipe (docs/protocol.md, sections 1 to 3).
--
-- libuv calls back in a "fast" context, where most of the editor's API is
-- off limits. Every callback here therefore only hands its data to
-- vim.schedule; lines are parsed and routed on the main loop, in the order
-- they arrived, since scheduled callbacks run first in, first out.

local uv = vim.loop

local M = {}

-- vim.json (lua-cjson) exists from Neovim 0.6 and may be used anywhere;
-- the Vim functions are the fallback, and are only ever called from the
-- main loop here.
local json_encode = vim.json and vim.json.encode or vim.fn.json_encode
local json_decode = vim.json and vim.json.decode or vim.fn.json_decode

-- Both decoders give JSON null as vim.NIL.
function M.is_null(value)
  return value == nil or value == vim.NIL
end

-- The reply a request gets when the connection closes before its answer.
local function disconnected(reason)
  return { ok = false, error = { code = 'disconnected', message = reason } }
end

local Connection = {}
Connection.__index = Connection

-- Calls `fn` and reports an error instead of losing it: a bug in one
-- handler must not silently stop the processing of the lines after it.
local function guarded(fn, ...)
  local ok, err = xpcall(fn, debug.traceback, ...)
  if not ok then
    vim.notify('presenced: internal error: ' .. tostring(err), vim.log.levels.ERROR)
  end
end

-- Whether group (0o020) or others (0o002) may write, by a file's mode.
local function others_may_write(mode)
  return math.floor(mode / 16) % 2 == 1 or math.floor(mode / 2) % 2 == 1
end

-- The folder holding `path`: '.' for a bare name, '/' for the root.
local function folder_of(path)
  local folder = path:match('^(.*)/[^/]*$')
  if folder == nil then
    return '.'
  end
  return folder == '' and '/' or folder
end

local function untrusted(why)
  return 'not trusted, nothing sent: ' .. why
end

-- The longest address a Unix socket takes (sun_path less its final NUL).
-- libuv cuts a longer one short, and would then connect somewhere else.
local MAX_SOCKET_ADDRESS = 107

-- What identifies a folder and says who may put a socket in it.
local function same_folder(a, b)
  return a.dev == b.dev and a.ino == b.ino and a.uid == b.uid and a.mode == b.mode
end

-- Why the folder `folder`, whose lstat is `stat`, may not be trusted, or
-- nil if it may. It must be a folder that nobody but its owner may write
-- to, and its owner this user, root, or a shared daemon's user: one whose
-- folders lead up to one of root's (or ours) that nobody else may write
-- to. `real` is where it really is, found only when that walk is needed.
local function distrust(folder, stat, real)
  local me, owner = uv.getuid(), stat.uid
  if others_may_write(stat.mode) then
    return ('its folder %s, of uid %d, may be written by group or others, so anyone could have put that socket there'):format(folder, owner)
  end
  if owner == me or owner == 0 then
    return nil
  end
  local above, err = real()
  if not above or above:sub(1, 1) ~= '/' then
    -- Walking up from a relative path would never reach the root ('.'
    -- is its own folder_of), and another user's folder must be walked.
    return ('its folder %s belongs to uid %d, and where it lies cannot be found (%s)'):format(folder, owner, err or above)
  end
  while above ~= '/' do
    above = folder_of(above)
    local up = uv.fs_stat(above)
    if not up then
      return ('cannot look at %s, above its folder %s of uid %d'):format(above, folder, owner)
    end
    if others_may_write(up.mode) then
      return ('its folder %s belongs to uid %d, not to you or root, and lies under %s, which others may write to, so anyone could have made it'):format(folder, owner, above)
    end
    if up.uid == me or up.uid == 0 then
      return nil
    end
    if up.uid ~= owner then
      return ('its folder %s belongs to uid %d, not to you or root, and lies under %s, which belongs to uid %d'):format(folder, owner, above, up.uid)
    end
  end
  return ('its folder %s belongs to uid %d, and so does every folder above it'):format(folder, owner)
end

-- The check docs/protocol.md section 1 asks of every client before it
-- sends a byte. The socket's folder is looked at without following a link,
-- then held open, and the connect goes into the folder held open
-- (/proc/self/fd/FD/NAME), so nobody can change which folder that is
-- between the check and the connect. Returns { folder, fd, stat, address },
-- or nil and why not: an error named by its errno when nothing can serve
-- the socket, or an untrusted(...) message.
--
-- A missing folder is never connected to: whoever made it between this
-- look and the connect would be trusted unchecked. `presence`, run then
-- to start a daemon, checks whatever it finds. A plugin cannot read a
-- socket's peer credentials (section 1, step 3); holding the folder open
-- does what that step does against a path changed under the check.
local function pin(path)
  local folder = folder_of(path)
  local seen, err = uv.fs_lstat(folder)
  if not seen then
    return nil, err
  end
  if seen.type == 'link' then
    return nil, untrusted(('its folder %s is a symbolic link, which leads wherever its maker chose'):format(folder))
  elseif seen.type ~= 'directory' then
    return nil, 'ENOTDIR: its folder ' .. folder .. ' is not a folder'
  end
  -- '/.' opens only a folder: never a FIFO that would block, nor a device.
  local fd, open_err = uv.fs_open(folder .. '/.', 'r', 0)
  if not fd then
    return nil, open_err
  end
  local function refuse(why)
    uv.fs_close(fd)
    return nil, why
  end
  local stat = uv.fs_fstat(fd)
  if not stat or stat.dev ~= seen.dev or stat.ino ~= seen.ino then
    return refuse(untrusted(('its folder %s changed while it was being looked at'):format(folder)))
  end
  local through = '/proc/self/fd/' .. fd
  local via = uv.fs_stat(through)
  local pinned = via and via.dev == stat.dev and via.ino == stat.ino
  local why = distrust(folder, stat, function()
    return uv.fs_realpath(pinned and through or folder)
  end)
  if why then
    return refuse(untrusted(why))
  end
  -- Without /proc the path itself is connected to; the look after the
  -- connect (M.open) is then what catches a change.
  local address = pinned and (through .. '/' .. path:match('[^/]*$')) or path
  if #address > MAX_SOCKET_ADDRESS then
    return refuse(('ENAMETOOLONG: %s is too long for a socket address'):format(address))
  end
  return { folder = folder, fd = fd, stat = stat, address = address }
end

-- Connects to the socket at `path`. `callback(err, conn)` runs on the
-- main loop. The connection then calls, on the main loop:
--   handlers.on_event(conn, message)   for every event line;
--   handlers.on_close(conn, reason, shutdown_reason)   once, when the
--     daemon closes the connection (never after conn:close()).
--     shutdown_reason is set when a `shutdown` event came first: the
--     daemon was stopped on purpose.
-- conn.answered is true once the daemon has answered one of its requests;
-- conn.refusal is the message of an error the daemon sent with `"id":
-- null` (one over --max-connections gets one before being closed).
function M.open(path, handlers, callback)
  -- Every attempt, first or after a close, comes through here.
  local pinned, why = pin(path)
  if not pinned then
    callback(why)
    return
  end
  local pipe = uv.new_pipe(false)
  if not pipe then
    uv.fs_close(pinned.fd)
    callback('could not create a pipe')
    return
  end
  local function fail(err)
    if not pipe:is_closing() then
      pipe:close()
    end
    callback(err)
  end
  local started, err = pcall(pipe.connect, pipe, pinned.address, function(connect_err)
    vim.schedule(function()
      uv.fs_close(pinned.fd)
      if connect_err then
        fail(connect_err)
        return
      end
      -- Before a byte is sent: does the path still lead to the folder
      -- checked, with the same owner and mode? If not, whoever changed it
      -- may be the one listening (when the path itself was connected to),
      -- or the folder may no longer be what was trusted.
      local now = uv.fs_lstat(pinned.folder)
      if not now or not same_folder(now, pinned.stat) then
        fail(untrusted(('its folder %s changed between the check and the connection'):format(pinned.folder)))
        return
      end
      local conn = setmetatable({
        pipe = pipe,
        path = path,
        handlers = handlers,
        pending = {},
        next_id = 0,
        partial = '',
        open = true,
        shutdown_reason = nil,
        answered = false,
        refusal = nil,
      }, Connection)
      conn:_start_reading()
      callback(nil, conn)
    end)
  end)
  if not started then
    uv.fs_close(pinned.fd)
    fail(tostring(err))
  end
end

function Connection:_start_reading()
  self.pipe:read_start(function(err, data)
    vim.schedule(function()
      if not self.open then
        return
      end
      if err then
        self:_lost('reading from the daemon failed: ' .. err)
      elseif data then
        self:_feed(data)
      else
        self:_lost('the daemon closed the connection')
      end
    end)
  end)
end

-- Splits what arrived into lines; a partial line waits for the rest.
function Connection:_feed(data)
  self.partial = self.partial .. data
  while self.open do
    local newline = self.partial:find('\n', 1, true)
    if not newline then
      return
    end
    local line = self.partial:sub(1, newline - 1)
    self.partial = self.partial:sub(newline + 1)
    if line:find('%S') then
      self:_dispatch(line)
    end
  end
end

-- A line with `event` is an event; any other line is a reply (section 3).
function Connection:_dispatch(line)
  local ok, message = pcall(json_decode, line)
  if not ok or type(message) ~= 'table' then
    vim.notify('presenced: the daemon sent a line that is not JSON: ' .. line, vim.log.levels.WARN)
    return
  end
  if not M.is_null(message.event) then
    if message.event == 'shutdown' then
      local payload = message.payload
      self.shutdown_reason = type(payload) == 'table' and payload.reason or 'shutdown'
    end
    guarded(self.handlers.on_event, self, message)
    return
  end
  if M.is_null(message.id) then
    -- A refusal of the connection or of a line the daemon could not read.
    if type(message.error) == 'table' then
      self.refusal = tostring(message.error.message or message.error.code)
    end
    return
  end
  local callback = self.pending[message.id]
  if callback == nil then
    return
  end
  self.pending[message.id] = nil
  self.answered = true
  if callback then
    guarded(callback, message)
  end
end

-- The connection is gone: every request still waiting gets a
-- `disconnected` reply, then the owner hears of it.
function Connection:_lost(reason)
  if not self.open then
    return
  end
  self:_shut(reason)
  guarded(self.handlers.on_close, self, reason, self.shutdown_reason)
end

function Connection:_shut(reason)
  self.open = false
  if not self.pipe:is_closing() then
    self.pipe:read_stop()
    self.pipe:close()
  end
  local pending = self.pending
  self.pending = {}
  for _, callback in pairs(pending) do
    if callback then
      guarded(callback, disconnected(reason))
    end
  end
end

-- Sends `message` (a request without `id`). `callback(reply)` runs on the
-- main loop with the reply, or with a `disconnected` error reply if the
-- connection closes first. Without a callback the reply is dropped.
function Connection:request(message, callback)
  if not self.open then
    if callback then
      callback(disconnected('not connected'))
    end
    return
  end
  self.next_id = self.next_id + 1
  message.id = self.next_id
  -- `false` still counts as waiting, for has_pending().
  self.pending[message.id] = callback or false
  self.pipe:write(json_encode(message) .. '\n', function(err)
    if err then
      vim.schedule(function()
        self:_lost('writing to the daemon failed: ' .. err)
      end)
    end
  end)
end

-- Whether some request has not been answered yet.
function Connection:has_pending()
  return next(self.pending) ~= nil
end

-- Closes the connection from this side. on_close is not called; requests
-- still waiting get a `disconnected` reply.
function Connection:close()
  if self.open then
    self:_shut('the connection was closed')
  end
end

return M
