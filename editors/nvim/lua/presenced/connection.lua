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
  local pipe = uv.new_pipe(false)
  if not pipe then
    callback('could not create a pipe')
    return
  end
  local started, err = pcall(pipe.connect, pipe, path, function(connect_err)
    vim.schedule(function()
      if connect_err then
        if not pipe:is_closing() then
          pipe:close()
        end
        callback(connect_err)
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
    if not pipe:is_closing() then
      pipe:close()
    end
    callback(tostring(err))
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
