-- presenced: one editable buffer per file across editors on this machine.
-- The commands exist from the start; the buffers are followed from setup(),
-- which the user's configuration may call with options (:help presenced).

if vim.g.loaded_presenced then
  return
end
vim.g.loaded_presenced = true

if vim.fn.has('nvim-0.7') ~= 1 then
  vim.notify('presenced: needs Neovim 0.7 or newer', vim.log.levels.WARN)
  return
end

vim.api.nvim_create_user_command('PresenceStatus', function()
  require('presenced').print_status()
end, { desc = "presenced: this buffer's role, topic and daemon" })

vim.api.nvim_create_user_command('PresenceWho', function()
  require('presenced').print_who()
end, { desc = "presenced: who is on this buffer's topic, in the order they joined" })

vim.api.nvim_create_user_command('PresenceWrite', function(command)
  require('presenced').write_anyway(command.bang)
end, { bang = true, desc = "presenced: write a spectator's copy over the owner's file" })

vim.api.nvim_create_user_command('PresenceJoin', function()
  require('presenced').join_again()
end, { desc = "presenced: queue again for this buffer's topic" })

vim.api.nvim_create_user_command('PresenceReconnect', function()
  require('presenced').reconnect()
end, { desc = 'presenced: try the daemon again' })

-- Without a setup() call in the configuration, start with the defaults.
-- Deferred, so that a plugin manager that loads this file and then calls
-- setup(opts) is not preceded by a setup with the wrong topic function.
vim.schedule(function()
  require('presenced').setup_once()
end)
