" presenced for Vim: every normal file buffer joins a topic on the presenced
" daemon, over its Unix socket (ch_open 'unix:' in NL mode, one JSON object
" per line; docs/protocol.md). The first editor on a topic owns it; every
" later one is a spectator whose buffer is 'nomodifiable', and never
" written to its file, until it is promoted.
"
" State, as in the Neovim plugin:
"   s:buffers[bufnr] = {topic, saved, last_message, read, swap_readonly}
"                             one per followed buffer; `read` is what the
"                             file was when the buffer last read or wrote
"                             it, {mtime, size, when}
"   s:entries[topic] = entry  one per topic, shared by its buffers (the
"                             daemon refuses a second entry for one topic
"                             and key on one connection)
"   s:by_ref[ref]    = entry  to route `role` events, which name the ref
"   s:link                    the connection and the state of reaching it

let s:save_cpo = &cpoptions
set cpoptions&vim

let s:buffers = {}
let s:entries = {}
let s:by_ref = {}
" Entries left while disconnected, {token, ref, topic}: resumed on the next
" connection only to be untracked, so the next in line need not wait for
" the daemon's grace period to run out.
let s:orphans = []

" state: 'idle' (not connected, not trying), 'connecting' (first time, or
" after the connection closed) or 'up'. generation is bumped by every new
" try and by quitting: a callback of an older try sees it and does nothing.
" outage is the try of the current spell without a working connection, from
" the first close: a connection the daemon closes before answering anything
" (one over --max-connections, say) does not end it, so such closes cannot
" restart the deadline forever. slow is set when a wait for a role ran out:
" later buffers do not wait again until the daemon answers.
let s:link = {'state': 'idle', 'conn': {}, 'generation': 0, 'error': '',
      \ 'reconnecting': 0, 'timer': -1, 'outage': {}, 'slow': 0}

" The buffer being written by :PresenceWrite!, which the write guard lets by.
let s:overriding = -1
" The daemon trouble last shown in a popup, so that it is shown once, not
" once per buffer; cleared when a connection works again.
let s:trouble_shown = ''
" What a suspended owner is told.
let s:suspended = "suspended: the shared topic's etcd cannot be reached"

" Configuration ----------------------------------------------------------

function! s:opt(name, default) abort
  return get(g:, 'presenced_' . a:name, a:default)
endfunction

function! s:default_topic(bufnr, path) abort
  return 'file:' . a:path
endfunction

function! s:login_name() abort
  if !exists('s:login')
    let s:login = $USER !=# '' ? $USER : $LOGNAME
    if s:login ==# ''
      let s:login = trim(system('id -un'))
    endif
  endif
  return s:login
endfunction

" The socket, found as the CLI finds it (docs/protocol.md, section 1).
function! presenced#socket_path() abort
  let configured = s:opt('socket', '')
  if configured !=# ''
    return expand(configured)
  endif
  if $PRESENCE_SOCKET !=# ''
    return $PRESENCE_SOCKET
  endif
  if $XDG_RUNTIME_DIR !=# ''
    return $XDG_RUNTIME_DIR . '/presenced/presenced.sock'
  endif
  return '/tmp/presenced-' . s:uid() . '/presenced.sock'
endfunction

function! s:uid() abort
  if !exists('s:uid')
    let s:uid = trim(system('id -u'))
  endif
  return s:uid
endfunction

" Helpers ----------------------------------------------------------------

function! s:notify(message, level) abort
  execute 'echohl' (a:level ==# 'error' ? 'ErrorMsg' : a:level ==# 'warn' ? 'WarningMsg' : 'None')
  echomsg 'presenced: ' . a:message
  echohl None
endfunction

" Milliseconds since the Unix epoch. Vim only tells seconds (localtime()),
" so the epoch is read once from date(1) and the rest counted by reltime().
function! s:now_ms() abort
  if !exists('s:epoch')
    let ms = str2nr(trim(system('date +%s%3N')))
    let s:epoch = {'ms': ms > 0 ? ms : localtime() * 1000, 'at': reltime()}
  endif
  return s:epoch.ms + float2nr(reltimefloat(reltime(s:epoch.at)) * 1000)
endfunction

" `14:05`, local time, of a time in milliseconds since the epoch.
function! s:clock(ms) abort
  return strftime('%H:%M', a:ms / 1000)
endfunction

" Says `text` (already starting with `presenced: `) so that it stays in
" sight: in :messages, in a popup notification where Vim has popups, and
" echoed again once Vim waits for keys: the screen drawn when a file opens
" at start-up wipes what was said before, and a file opened later says
" "notes.md" 2L, 18B after it. Once Vim runs, the screen is redrawn first,
" so that two messages from one callback do not make Vim ask for Enter.
function! s:show(text, level) abort
  let highlight = a:level ==# 'error' ? 'ErrorMsg' : a:level ==# 'warn' ? 'WarningMsg' : 'None'
  " Not while a command line is typed: it would be drawn over.
  if v:vim_did_enter && mode() !~# '^c'
    redraw
  endif
  execute 'echohl' highlight
  echomsg a:text
  echohl None
  let popup_ms = s:opt('popup_ms', 6000)
  if has('popupwin') && popup_ms > 0
    " One at a time: an older one ("is editing; read-only") must not stay
    " beside the news that replaced it ("you own it now").
    if exists('s:popup')
      silent! call popup_close(s:popup)
    endif
    silent! let s:popup = popup_notification(a:text, {'time': popup_ms,
          \ 'highlight': a:level ==# 'info' ? 'PopupNotification' : highlight})
  endif
  call s:echo_later(a:text, highlight)
endfunction

" Echoes `text` once Vim waits for keys; only the latest, by one timer.
function! s:echo_later(text, highlight) abort
  let s:echo_pending = [a:text, a:highlight]
  if !exists('s:echo_timer') || empty(timer_info(s:echo_timer))
    let s:echo_timer = timer_start(0, {-> s:echo_again()})
  endif
endfunction

" Echoes, not echomsg: it is in :messages already. Cut to the screen's width
" so that it never asks for Enter.
function! s:echo_again() abort
  let [text, highlight] = s:echo_pending
  let width = &columns - 12
  if strdisplaywidth(text) > width && width > 3
    let text = strcharpart(text, 0, width - 3) . '...'
  endif
  execute 'echohl' highlight
  echo text
  echohl None
endfunction

" The absolute path with symbolic links resolved; for a file that does
" not exist yet, its folder's resolved path and its name.
function! s:resolve_path(name) abort
  let full = fnamemodify(a:name, ':p')
  if filereadable(full) || getftype(full) !=# ''
    " A link that leads round in a circle (E655) has no file to name.
    try
      return resolve(full)
    catch /^Vim\%((\a\+)\)\=:E655:/
      return full
    endtry
  endif
  let folder = resolve(fnamemodify(full, ':h'))
  return substitute(folder, '/$', '', '') . '/' . fnamemodify(full, ':t')
endfunction

" A loaded buffer holding a file: no special 'buftype', a name that is not a
" URL, and not a folder. An unloaded buffer is not open: :saveas renames its
" old name's unloaded alternate buffer. `opening`: the buffer is being
" loaded (SwapExists comes before it counts as loaded).
function! s:is_file_buffer(bufnr, ...) abort
  let opening = a:0 && a:1
  if !bufexists(a:bufnr) || !(opening || bufloaded(a:bufnr)) || getbufvar(a:bufnr, '&buftype') !=# ''
    return 0
  endif
  let name = bufname(a:bufnr)
  return name !=# '' && name !~# '^\a[[:alnum:]+.-]*://' && !isdirectory(name)
endfunction

function! s:topic_of(bufnr) abort
  let path = s:resolve_path(bufname(a:bufnr))
  let Topic = s:opt('topic', function('s:default_topic'))
  try
    let topic = call(Topic, [a:bufnr, path])
  catch
    call s:notify('the topic function failed for ' . path . ': ' . v:exception, 'error')
    return ['', path]
  endtry
  return [type(topic) == v:t_string ? topic : '', path]
endfunction

function! s:key_of(bufnr) abort
  let Key = s:opt('key', '')
  if type(Key) == v:t_func
    let Key = call(Key, [a:bufnr])
  endif
  return type(Key) == v:t_string && Key !=# '' ? Key : s:login_name()
endfunction

" What others see of this entry. `user`, `pid` and the like are reserved
" for the daemon, which takes them from the socket's credentials.
function! s:meta_of(bufnr, path) abort
  let meta = {'editor': printf('vim %d.%d', v:version / 100, v:version % 100),
        \ 'file': a:path, 'login': s:login_name()}
  let Extra = s:opt('meta', {})
  if type(Extra) == v:t_func
    let Extra = call(Extra, [a:bufnr])
  endif
  if type(Extra) == v:t_dict
    call extend(meta, Extra)
  endif
  return meta
endfunction

" `alice (pid 4242)`, as the CLI names an owner.
function! s:who(owner) abort
  if type(a:owner) != v:t_dict
    return 'nobody'
  endif
  return printf('%s (pid %s)', a:owner.key, a:owner.pid)
endfunction

function! s:display_name(bufnr) abort
  return fnamemodify(bufname(a:bufnr), ':~:.')
endfunction

function! s:standing_of(fields) abort
  " `suspended`: the owner of a topic shared across hosts, held back while
  " its daemon cannot reach etcd; its role is 'spectator' (so read-only).
  return {'role': a:fields.role, 'readonly': a:fields.readonly,
        \ 'position': a:fields.position, 'owner': a:fields.owner,
        \ 'suspended': get(a:fields, 'suspended', v:false) is v:true}
endfunction

" Waits, running channel callbacks and timers, until Condition() holds or
" `ms` milliseconds pass; :sleep is where Vim handles them.
function! s:wait_until(Condition, ms) abort
  let start = reltime()
  while !a:Condition()
    if reltimefloat(reltime(start)) * 1000 >= a:ms
      return 0
    endif
    sleep 5m
  endwhile
  return 1
endfunction

" Buffer options ---------------------------------------------------------

" Makes the buffer read-only for presenced: 'nomodifiable', so that typing
" gives E21, and the write guard (presenced#guard) refuses every write of
" it to its own file. 'readonly' is left off on purpose: with it a plain :w
" would fail first with Vim's own E45, which says "add ! to override" and
" nothing of who owns the file. The user's settings are remembered the
" first time, to give them back on promotion; a 'readonly' that came from
" this plugin's answer to the swap-file question was never the user's.
function! s:restrict(bufnr) abort
  let buf = s:buffers[a:bufnr]
  if empty(buf.saved)
    let buf.saved = {'modifiable': getbufvar(a:bufnr, '&modifiable'),
          \ 'readonly': buf.swap_readonly ? 0 : getbufvar(a:bufnr, '&readonly')}
    let buf.swap_readonly = 0
  endif
  " Set every time: reading the file again (:edit!) resets them.
  call setbufvar(a:bufnr, '&modifiable', 0)
  call setbufvar(a:bufnr, '&readonly', 0)
endfunction

" Gives the user's settings back; 1 if the buffer was restricted.
function! s:unrestrict(bufnr) abort
  let buf = get(s:buffers, a:bufnr, {})
  if empty(buf) || empty(buf.saved)
    return 0
  endif
  if bufexists(a:bufnr)
    call setbufvar(a:bufnr, '&modifiable', buf.saved.modifiable)
    call setbufvar(a:bufnr, '&readonly', buf.saved.readonly)
  endif
  let buf.saved = {}
  return 1
endfunction

" Says `text` about the buffer, in sight (s:show), unless it is what was
" last said of it. `trouble`: the daemon's trouble, whose popup is shown
" once whatever the number of buffers.
function! s:say(bufnr, text, level, ...) abort
  let buf = s:buffers[a:bufnr]
  if buf.last_message ==# a:text
    return
  endif
  let buf.last_message = a:text
  let trouble = a:0 ? a:1 : ''
  if trouble ==# ''
    call s:show(a:text, a:level)
  elseif s:trouble_shown !=# trouble
    let s:trouble_shown = trouble
    call s:show(a:text, a:level)
  else
    call s:notify(a:text[len('presenced: '):], a:level)
  endif
endfunction

" s:say of `presenced: NAME: message`.
function! s:tell(bufnr, message, level, ...) abort
  call call('s:say', [a:bufnr, 'presenced: ' . s:display_name(a:bufnr) . ': ' . a:message, a:level] + a:000)
endfunction

" What the file on disk is now, to compare with later. `when` is a
" reltime(): the time since the epoch costs a process the first time, so it
" is worked out only when a comparison needs it (s:read_at).
function! s:stat_of(bufnr) abort
  let path = s:resolve_path(bufname(a:bufnr))
  return {'mtime': getftime(path), 'size': getfsize(path), 'when': reltime()}
endfunction

" When the buffer last read or wrote its file, in ms since the epoch.
function! s:read_at(buf) abort
  return s:now_ms() - float2nr(reltimefloat(reltime(a:buf.read.when)) * 1000)
endfunction

" The buffer holds what its file holds now: it was just read or written.
function! s:record_read(bufnr) abort
  let buf = get(s:buffers, a:bufnr, {})
  if !empty(buf)
    let buf.read = s:stat_of(a:bufnr)
    call setbufvar(a:bufnr, 'presenced_stale', 0)
  endif
endfunction

" Why the file differs from the buffer, or '' if it does not seem to: its
" mtime or size changed since the buffer read it, or someone saved it
" after that (mtimes count whole seconds; the saves' times do not).
function! s:change_on_disk(bufnr, entry) abort
  let buf = s:buffers[a:bufnr]
  " The latest save by another editor seen in the subscription's metas.
  let save = a:entry.last_save
  let saved_since = !empty(save) && !empty(buf.read) && save.at > s:read_at(buf)
  let now = s:stat_of(a:bufnr)
  let changed = empty(buf.read) || now.mtime != buf.read.mtime || now.size != buf.read.size
  if !changed && !saved_since
    return ''
  endif
  return saved_since ? printf('%s saved it at %s', save.key, s:clock(save.at)) : 'it changed on disk'
endfunction

" Reads the buffer's file again, keeping the cursor and view of every
" window that shows it. A buffer no window shows is read when it is next
" shown (presenced#shown): 0 then, 1 if read now. Never called for a
" buffer with changes.
function! s:reload(bufnr) abort
  let windows = win_findbuf(a:bufnr)
  if empty(windows)
    call setbufvar(a:bufnr, 'presenced_stale', 1)
    return 0
  endif
  for id in windows
    call win_execute(id, 'let w:presenced_view = winsaveview()')
  endfor
  " :edit! reads the file and runs BufReadPost, which applies the role
  " again (reading resets 'modifiable' and 'readonly') and records the read.
  " It also looks for a swap file again (presenced#swap_exists answers).
  let buf = s:buffers[a:bufnr]
  let buf.reloading = 1
  let buf.swap_found = ''
  try
    call win_execute(windows[0], 'silent keepjumps edit!')
  finally
    let buf.reloading = 0
  endtry
  for id in windows
    call win_execute(id, 'call winrestview(w:presenced_view) | unlet w:presenced_view')
  endfor
  if buf.swap_found !=# ''
    " Said after the read: a message shown from inside SwapExists would be
    " drawn over by the reading.
    call s:show(printf('presenced: %s: a swap file of another session exists (%s); :recover it if its changes matter',
          \ s:display_name(a:bufnr), buf.swap_found), 'warn')
    let buf.swap_found = ''
  endif
  return 1
endfunction

" The buffer became its file's owner: the user's settings come back, a
" 'readonly' set by the swap-file answer goes, and if the file changed on
" disk since the buffer read it the buffer reads it again.
function! s:become_owner(bufnr, entry) abort
  let buf = s:buffers[a:bufnr]
  let was_restricted = s:unrestrict(a:bufnr)
  if buf.swap_readonly
    let buf.swap_readonly = 0
    call setbufvar(a:bufnr, '&readonly', 0)
    let was_restricted = 1
  endif
  if !was_restricted
    let buf.last_message = ''
    return
  endif
  let prefix = 'presenced: you own ' . s:display_name(a:bufnr) . ' now; '
  let change = s:change_on_disk(a:bufnr, a:entry)
  if change ==# ''
    call s:say(a:bufnr, prefix . 'editable again', 'info')
  elseif getbufvar(a:bufnr, '&modified')
    " A spectator cannot change its buffer; if this one did, its changes
    " are the user's to keep or drop.
    call s:say(a:bufnr, prefix . change . ', but this buffer has unsaved changes of its own, so it was not reloaded: :edit! takes the file, :w keeps yours', 'warn')
  elseif s:reload(a:bufnr)
    call s:say(a:bufnr, prefix . 'reloaded: ' . change, 'info')
  else
    " No window shows it: it is read when next shown (presenced#shown).
    call s:say(a:bufnr, prefix . change . ', so it is read again when next shown', 'info')
  endif
endfunction

" Spectators follow the saves of the others (the owner's, or an override's):
" the buffer reads the file again, unless it has changes of its own.
function! s:follow_save(bufnr, save) abort
  if getbufvar(a:bufnr, '&modified')
    return
  endif
  if !s:reload(a:bufnr)
    return
  endif
  " Not s:say: its memory of the last message is for the standing, which
  " a reload says nothing new about.
  call s:show(printf('presenced: %s: reloaded: %s saved it at %s', s:display_name(a:bufnr),
        \ a:save.key, s:clock(a:save.at)), 'info')
endfunction

" `removed by root (uid 0, pid 8120); read-only. :PresenceJoin to queue again`
function! s:removed_message(entry) abort
  let by = get(a:entry.removal, 'by', {})
  return printf('removed by %s (uid %s, pid %s); read-only. :PresenceJoin to queue again',
        \ get(by, 'user', '?'), get(by, 'uid', '?'), get(by, 'pid', '?'))
endfunction

" Puts the buffer in the state its entry calls for, and says why when that
" changes.
function! s:apply(bufnr) abort
  let buf = get(s:buffers, a:bufnr, {})
  if empty(buf) || !has_key(s:entries, buf.topic) || !bufexists(a:bufnr)
    return
  endif
  let entry = s:entries[buf.topic]
  if entry.status ==# 'joined'
    let s:trouble_shown = ''
    if entry.standing.role ==# 'owner'
      call s:become_owner(a:bufnr, entry)
    else
      let modified = getbufvar(a:bufnr, '&modified')
      call s:restrict(a:bufnr)
      let message = s:who(entry.standing.owner) . ' is editing; read-only'
      if get(entry.standing, 'suspended', 0)
        let message = s:suspended . '; read-only until it returns'
      endif
      if modified
        let message .= ' (your unsaved changes are kept)'
      endif
      call s:tell(a:bufnr, message, 'warn')
    endif
  elseif entry.status ==# 'removed'
    call s:restrict(a:bufnr)
    call s:tell(a:bufnr, s:removed_message(entry), 'warn')
  elseif entry.status ==# 'unreachable'
    let reason = printf('cannot reach the daemon at %s (%s)', presenced#socket_path(),
          \ s:link.error !=# '' ? s:link.error : 'no answer')
    if s:opt('on_unreachable', 'editable') ==# 'readonly'
      call s:restrict(a:bufnr)
      call s:tell(a:bufnr, reason . '; read-only until it answers', 'warn', reason)
    else
      call s:unrestrict(a:bufnr)
      call s:tell(a:bufnr, reason . '; editable, but nobody else will know you are editing it', 'warn', reason)
    endif
  elseif entry.status ==# 'refused'
    call s:unrestrict(a:bufnr)
    call s:tell(a:bufnr, 'the daemon refused to track it (' . entry.error . '); editable', 'warn', entry.error)
  endif
  " 'joining': left as it is until the answer comes.
endfunction

" Applies the entry's state to its buffers, then lets the statusline and
" any `User PresencedRole` autocommand see it.
function! s:apply_entry(entry) abort
  for bufnr in keys(a:entry.bufs)
    call s:apply(str2nr(bufnr))
  endfor
  redrawstatus!
  if exists('#User#PresencedRole')
    doautocmd <nomodeline> User PresencedRole
  endif
endfunction

function! s:set_standing(entry, standing) abort
  let s:link.slow = 0
  let a:entry.status = 'joined'
  let a:entry.standing = a:standing
  call s:apply_entry(a:entry)
endfunction

" Presences seen through the subscription ---------------------------------

" Adds the metas of a Phoenix-shaped {key: {metas: [...]}} to `into`, by ref.
function! s:add_metas(into, presences) abort
  if type(a:presences) != v:t_dict
    return
  endif
  for [key, presence] in items(a:presences)
    for meta in get(presence, 'metas', [])
      let a:into[meta.phx_ref] = extend(copy(meta), {'key': key})
    endfor
  endfor
endfunction

" Whether `a` and `b` (metas, or the `owner` the daemon names) are one entry.
" Not by ref: an update (every save sends one) gives the entry a new ref,
" and no role event tells a spectator its owner's new one. The key, the
" process and the time it joined are what an update keeps.
function! s:same_entry(a, b) abort
  if type(a:a) != v:t_dict || type(a:b) != v:t_dict
    return 0
  endif
  for field in ['key', 'pid', 'joined_at']
    if !has_key(a:a, field) || !has_key(a:b, field)
          \ || type(a:a[field]) != type(a:b[field]) || a:a[field] !=# a:b[field]
      return 0
    endif
  endfor
  return 1
endfunction

" Notes a save seen in another entry's meta, the latest one kept: it names
" who saved the file last when this editor is promoted.
function! s:note_save(entry, meta) abort
  let at = get(a:meta, 'saved_at', 0)
  if type(at) != v:t_number || at <= 0 || a:meta.phx_ref ==# a:entry.ref
    return {}
  endif
  let save = {'key': a:meta.key, 'at': at}
  if empty(a:entry.last_save) || at > a:entry.last_save.at
    let a:entry.last_save = save
  endif
  return save
endfunction

function! s:on_presence_event(message) abort
  let entry = get(s:entries, a:message.topic, {})
  if empty(entry)
    return
  endif
  " Who owns the topic, as the daemon says after this event.
  let entry.topic_owner = type(get(a:message, 'owner', v:null)) == v:t_dict ? a:message.owner : v:null
  " The same owner as the standing's, by its latest ref: the owner's saves
  " change its ref, and no role event says so.
  if s:same_entry(get(entry.standing, 'owner', v:null), entry.topic_owner)
    let entry.standing.owner = entry.topic_owner
  endif
  if a:message.event ==# 'presence_state'
    " A state replaces the whole view, even one not asked for (section 14).
    let entry.metas = {}
    call s:add_metas(entry.metas, a:message.payload)
    for meta in values(entry.metas)
      call s:note_save(entry, meta)
    endfor
    return
  endif
  let before = {}
  for presence in values(get(a:message.payload, 'leaves', {}))
    for meta in get(presence, 'metas', [])
      let before[meta.phx_ref] = meta
      silent! call remove(entry.metas, meta.phx_ref)
    endfor
  endfor
  let joined = {}
  call s:add_metas(joined, get(a:message.payload, 'joins', {}))
  call extend(entry.metas, joined)
  let reasons = get(a:message, 'reasons', {})
  for meta in values(joined)
    let previous = get(meta, 'phx_ref_prev', '')
    let save = s:note_save(entry, meta)
    " Another editor saved the file: its update changed saved_at. That is
    " the owner, or a spectator that wrote over it with :PresenceWrite!. A
    " spectator reads the file again, so it shows what is on disk now; the
    " owner does not (Vim warns it at its next write that the file changed).
    if !empty(save) && type(previous) == v:t_string && get(reasons, previous, '') ==# 'update'
          \ && get(get(before, previous, {}), 'saved_at', 0) != save.at
          \ && entry.status ==# 'joined' && get(entry.standing, 'role', '') ==# 'spectator'
      for bufnr in keys(entry.bufs)
        call s:follow_save(str2nr(bufnr), save)
      endfor
    endif
  endfor
endfunction

" The entries on the topic in the order they joined, for display only: who
" owns the topic and where each one stands is the daemon's to say.
function! s:in_join_order(entry) abort
  return sort(values(a:entry.metas), {a, b -> a.seq - b.seq})
endfunction

" The owner the daemon last named to the subscription of a removed entry
" (whoever was promoted when it went), or v:null: none is known, or the one
" named is the removed entry itself.
function! s:owner_after_removal(entry) abort
  let owner = a:entry.topic_owner
  if type(owner) != v:t_dict || owner.phx_ref ==# get(a:entry.removal, 'ref', '')
    return v:null
  endif
  return owner
endfunction

" The connection -----------------------------------------------------------

" [dev, inode, uid, mode in hex] of each path, as text, by stat(1), since
" Vim has no lstat of its own; without -L, stat does not follow a link. Or
" a string: why not.
function! s:lstat(paths) abort
  let lines = systemlist('stat -c "%d %i %u %f" -- ' . join(map(copy(a:paths), 'shellescape(v:val)')))
  if v:shell_error || len(lines) != len(a:paths)
    return join(lines, ' ')
  endif
  return map(lines, {_, line -> split(line)})
endfunction

" The check docs/protocol.md section 1 asks of every client before it sends
" a byte. The socket's folder, not followed if it is a link, must be a
" folder that nobody but its owner may write to, and its owner this user,
" root, or a shared daemon's user: one whose folders lead up to one of
" root's (or ours) that nobody else may write to.
"
" Returns what it saw, {folder, seen}, to look again once connected; or a
" string, why not to connect: 'no socket there: …' when nothing can serve
" the socket, 'not trusted, nothing sent: …' when someone else could. A
" missing folder is never connected to: whoever made it between this look
" and the connect would be trusted. `presence` then starts a daemon, and
" checks what it finds first.
"
" Vim can neither read a socket's peer credentials, which `presence`
" checks as well, nor hold the folder open while it connects: it connects
" by path, and can only look again afterwards (s:open).
function! s:check(path) abort
  let folder = fnamemodify(a:path, ':h')
  if getftype(folder) ==# ''
    return printf('no socket there: its folder %s is missing or out of reach', folder)
  endif
  let untrusted = 'not trusted, nothing sent: '
  let found = s:lstat([folder])
  if type(found) == v:t_string
    return untrusted . printf('cannot look at its folder %s with stat: %s', folder, found)
  endif
  let seen = found[0]
  let [owner, mode] = [str2nr(seen[2]), str2nr(seen[3], 16)]
  " The file type bits: 0o120000 a link, 0o040000 a folder.
  if and(mode, 0xF000) == 0xA000
    return untrusted . printf('its folder %s is a symbolic link, which leads wherever its maker chose', folder)
  elseif and(mode, 0xF000) != 0x4000
    return printf('its folder %s is not a folder', folder)
  endif
  " 18 is 0o022, write access for group or others.
  if and(mode, 18)
    return untrusted . printf('its folder %s, of uid %d, may be written by group or others, so anyone could have put that socket there', folder, owner)
  endif
  let me = str2nr(s:uid())
  let checked = {'folder': folder, 'seen': seen}
  if owner == me || owner == 0
    return checked
  endif
  " Another user's folder: walk up from where it really is. A path that is
  " not absolute (the working folder was removed, say) would never get
  " there, since '.' is its own parent.
  let real = resolve(fnamemodify(folder, ':p'))
  if real !~# '^/'
    return untrusted . printf('its folder %s belongs to uid %d, and where it lies cannot be found', folder, owner)
  endif
  let chain = []
  let above = substitute(real, '.\zs/\+$', '', '')
  while above !=# '/'
    let above = fnamemodify(above, ':h')
    call add(chain, above)
  endwhile
  let found = s:lstat(chain)
  if type(found) == v:t_string
    return untrusted . printf('cannot look at the folders above its folder %s with stat: %s', folder, found)
  endif
  for index in range(len(chain))
    let [uid, mode] = [str2nr(found[index][2]), str2nr(found[index][3], 16)]
    if and(mode, 18)
      return untrusted . printf('its folder %s belongs to uid %d, not to you or root, and lies under %s, which others may write to, so anyone could have made it', folder, owner, chain[index])
    elseif uid == me || uid == 0
      return checked
    elseif uid != owner
      return untrusted . printf('its folder %s belongs to uid %d, not to you or root, and lies under %s, which belongs to uid %d', folder, owner, chain[index], uid)
    endif
  endfor
  return untrusted . printf('its folder %s belongs to uid %d, and so does every folder above it', folder, owner)
endfunction

" Connects to `path`. Returns a connection dict, or a string: the reason.
" Every attempt, first or after a close, comes through here.
function! s:open(path) abort
  let checked = s:check(a:path)
  if type(checked) == v:t_string
    return checked
  endif
  " answered: the daemon answered one of our requests. refusal: the message
  " of an error it sent with "id": null, as before closing a connection over
  " --max-connections.
  let conn = {'open': 1, 'pending': {}, 'next_id': 0, 'shutdown_reason': '', 'path': a:path,
        \ 'answered': 0, 'refusal': ''}
  let v:errmsg = ''
  silent! let channel = ch_open('unix:' . a:path, {'mode': 'nl',
        \ 'callback': function('s:on_line', [conn]),
        \ 'close_cb': function('s:on_channel_closed', [conn])})
  if !exists('channel') || ch_status(channel) !=# 'open'
    return v:errmsg !=# '' ? substitute(v:errmsg, '^E\d\+: ', '', '') : 'cannot connect'
  endif
  " Before a byte is sent: does the path still lead to the folder checked,
  " with the same owner and mode? Vim connected by path, so whoever changed
  " it in between may be the one listening. (A folder changed and changed
  " back before this look goes unseen: docs/editors.md says when that can
  " happen.)
  let now = s:lstat([checked.folder])
  if type(now) == v:t_string || now[0] != checked.seen
    let conn.open = 0
    silent! call ch_close(channel)
    return printf('not trusted, nothing sent: its folder %s changed between the check and the connection', checked.folder)
  endif
  let conn.channel = channel
  return conn
endfunction

" A line with `event` is an event; any other line is a reply (section 3).
function! s:on_line(conn, channel, line) abort
  if !a:conn.open || a:line !~# '\S'
    return
  endif
  try
    let message = json_decode(a:line)
  catch
    call s:notify('the daemon sent a line that is not JSON: ' . a:line, 'warn')
    return
  endtry
  if type(message) != v:t_dict
    return
  endif
  if has_key(message, 'event') && message.event isnot v:null
    if message.event ==# 'shutdown'
      let a:conn.shutdown_reason = get(get(message, 'payload', {}), 'reason', 'shutdown')
    endif
    call s:on_event(a:conn, message)
    return
  endif
  if get(message, 'id', v:null) is v:null
    if type(get(message, 'error', 0)) == v:t_dict
      let what = get(message.error, 'message', get(message.error, 'code', ''))
      let a:conn.refusal = type(what) == v:t_string ? what : string(what)
    endif
    return
  endif
  let id = string(message.id)
  if !has_key(a:conn.pending, id)
    return
  endif
  let Callback = remove(a:conn.pending, id)
  let a:conn.answered = 1
  if type(Callback) == v:t_func
    call Callback(message)
  endif
endfunction

function! s:on_channel_closed(conn, channel) abort
  if a:conn.open
    call s:shut(a:conn, 'the daemon closed the connection')
    call s:on_close(a:conn)
  endif
endfunction

" Every request still waiting gets a `disconnected` reply.
function! s:shut(conn, reason) abort
  let a:conn.open = 0
  let pending = a:conn.pending
  let a:conn.pending = {}
  for Callback in values(pending)
    if type(Callback) == v:t_func
      call Callback({'ok': v:false, 'error': {'code': 'disconnected', 'message': a:reason}})
    endif
  endfor
endfunction

function! s:close(conn) abort
  if a:conn.open
    call s:shut(a:conn, 'the connection was closed')
    silent! call ch_close(a:conn.channel)
  endif
endfunction

" Sends `message`; Callback(reply) gets the reply, or a `disconnected` error
" reply if the connection closes first. 0 drops the reply.
function! s:request(conn, message, Callback) abort
  if !a:conn.open
    if type(a:Callback) == v:t_func
      call a:Callback({'ok': v:false, 'error': {'code': 'disconnected', 'message': 'not connected'}})
    endif
    return
  endif
  let a:conn.next_id += 1
  let a:message.id = a:conn.next_id
  let a:conn.pending[string(a:conn.next_id)] = a:Callback
  try
    call ch_sendraw(a:conn.channel, json_encode(a:message) . "\n")
  catch
    " The close callback follows and starts the reconnect.
    call s:shut(a:conn, 'writing to the daemon failed: ' . v:exception)
    call s:on_close(a:conn)
  endtry
endfunction

" Talking to the daemon ----------------------------------------------------

function! s:on_track_reply(conn, entry, reply) abort
  let a:entry.tracking = 0
  if a:reply.ok && a:entry.left
    " The buffer went while the track was on its way.
    if a:conn.open
      call s:request(a:conn, {'op': 'untrack', 'topic': a:entry.topic, 'ref': a:reply.ref}, 0)
      if !has_key(s:entries, a:entry.topic)
        call s:request(a:conn, {'op': 'unsubscribe', 'topic': a:entry.topic}, 0)
      endif
    endif
    return
  endif
  if a:entry.left || a:conn isnot s:link.conn
    return
  endif
  if a:reply.ok
    call s:take_ref(a:entry, a:reply.ref)
    let a:entry.token = a:reply.resume_token
    let a:entry.meta_dirty = 0
    call s:set_standing(a:entry, s:standing_of(a:reply))
  elseif a:reply.error.code !=# 'disconnected'
    " A disconnect is retried by the reconnect; anything else is final.
    let a:entry.status = 'refused'
    let a:entry.error = a:reply.error.message
    let s:link.slow = 0
    call s:apply_entry(a:entry)
  endif
endfunction

" The entry is known by `ref` from now on.
function! s:take_ref(entry, ref) abort
  if a:entry.ref !=# ''
    silent! call remove(s:by_ref, a:entry.ref)
  endif
  let a:entry.ref = a:ref
  let s:by_ref[a:ref] = a:entry
endfunction

" Another connection took the entry away (a `removed` event, or the
" `removed` part of a resume reply): it holds no place any more, and its
" token is spent. Its buffers become read-only until :PresenceJoin.
function! s:removed(entry, removal) abort
  if a:entry.ref !=# ''
    silent! call remove(s:by_ref, a:entry.ref)
  endif
  let a:entry.ref = ''
  let a:entry.token = ''
  let a:entry.status = 'removed'
  let a:entry.removal = a:removal
  let a:entry.standing = {}
  call s:apply_entry(a:entry)
endfunction

" The meta fields this plugin adds after joining, which an `updated` event
" (someone else's change of the entry) must not drop while they are still
" being sent.
let s:own_fields = ['saved_at', 'saves', 'overrode']

" Sends the entry's meta with `update`, one at a time: each update gives
" the entry a new ref, which the next one must name. A meta changed while
" one is on its way is sent after it; one changed while disconnected is
" sent after the resume.
function! s:send_meta(entry) abort
  let a:entry.meta_dirty = 1
  if a:entry.updating || a:entry.ref ==# '' || s:link.state !=# 'up'
    return
  endif
  let a:entry.updating = 1
  let a:entry.meta_dirty = 0
  let conn = s:link.conn
  let sent_ref = a:entry.ref
  call s:request(conn, {'op': 'update', 'topic': a:entry.topic, 'ref': sent_ref,
        \ 'meta': a:entry.meta}, function('s:on_update_reply', [conn, a:entry, sent_ref]))
endfunction

function! s:on_update_reply(conn, entry, sent_ref, reply) abort
  let a:entry.updating = 0
  if a:entry.left
    " The buffer went while the update was on its way: its untrack waited
    " for the ref the update gave.
    if a:reply.ok && a:conn.open
      call s:request(a:conn, {'op': 'untrack', 'topic': a:entry.topic, 'ref': a:reply.ref}, 0)
      if !has_key(s:entries, a:entry.topic)
        call s:request(a:conn, {'op': 'unsubscribe', 'topic': a:entry.topic}, 0)
      endif
    elseif !a:reply.ok && a:entry.token !=# ''
      call add(s:orphans, {'token': a:entry.token, 'ref': '', 'topic': a:entry.topic})
    endif
    return
  endif
  if a:reply.ok && get(s:by_ref, get(a:reply, 'prev_ref', ''), {}) is a:entry
    call s:take_ref(a:entry, a:reply.ref)
  elseif !a:reply.ok && a:reply.error.code ==# 'disconnected'
    let a:entry.meta_dirty = 1
  elseif !a:reply.ok && a:entry.ref !=# '' && a:entry.ref !=# a:sent_ref
    " The entry changed hands under the update (root's `update` gave it a
    " new ref, and the daemon no longer knew the one sent): send it again
    " with the new ref.
    let a:entry.meta_dirty = 1
  endif
  if a:entry.meta_dirty && !a:entry.left && a:conn is s:link.conn
    call s:send_meta(a:entry)
  endif
endfunction

function! s:track(entry) abort
  let conn = s:link.conn
  let a:entry.tracking = 1
  " lifetime "connection": the entry dies with the connection, so a killed
  " editor's spectators are promoted at once.
  call s:request(conn, {'op': 'track', 'topic': a:entry.topic, 'key': a:entry.key,
        \ 'meta': a:entry.meta, 'lifetime': 'connection', 'subscribe': v:true},
        \ function('s:on_track_reply', [conn, a:entry]))
endfunction

function! s:join(entry) abort
  let a:entry.status = 'joining'
  if s:link.state ==# 'up'
    call s:track(a:entry)
  elseif s:link.state ==# 'idle'
    call s:connect()
  endif
  " 'connecting': the new connection tracks it once up.
endfunction

function! s:leave(entry) abort
  let a:entry.left = 1
  if a:entry.ref !=# ''
    silent! call remove(s:by_ref, a:entry.ref)
  endif
  if a:entry.updating
    " Its ref is about to change: the update's reply untracks it.
    return
  elseif s:link.state ==# 'up' && a:entry.ref !=# ''
    call s:request(s:link.conn, {'op': 'untrack', 'topic': a:entry.topic, 'ref': a:entry.ref}, 0)
    if !has_key(s:entries, a:entry.topic)
      call s:request(s:link.conn, {'op': 'unsubscribe', 'topic': a:entry.topic}, 0)
    endif
  elseif a:entry.token !=# ''
    call add(s:orphans, {'token': a:entry.token, 'ref': a:entry.ref, 'topic': a:entry.topic})
  endif
  " A track still on its way is untracked when its reply comes.
endfunction

" Starts a daemon through the CLI, which waits until it serves the socket.
function! s:start_daemon(path, Callback) abort
  let command = s:opt('command', 'presence')
  let stderr = []
  try
    let job = job_start([command, '--socket=' . a:path, 'list', '--json'], {
          \ 'in_io': 'null', 'out_io': 'null',
          \ 'err_cb': {channel, line -> add(stderr, line)},
          \ 'exit_cb': {job, code -> a:Callback(code == 0 ? '' :
          \   printf('could not start a daemon: `%s list` exited with status %d%s', command, code,
          \          empty(stderr) ? '' : ': ' . join(stderr, ' ')))}})
  catch
    call a:Callback(printf('could not start a daemon: cannot run `%s`: %s', command, v:exception))
    return
  endtry
  if job_status(job) ==# 'fail'
    call a:Callback(printf('could not start a daemon: cannot run `%s`', command))
  endif
endfunction

" Whether a failed connect means nobody serves the socket, as opposed to,
" say, a permission problem a new daemon would not fix.
function! s:worth_starting(error) abort
  return a:error =~? 'no socket there\|no such file\|refused'
endfunction

function! s:stop_retrying() abort
  if s:link.timer != -1
    call timer_stop(s:link.timer)
    let s:link.timer = -1
  endif
endfunction

" Tracks every entry that has no place yet: new ones, ones that expired
" while away, and ones that could not be tracked before.
function! s:track_unjoined(conn) abort
  for entry in values(s:entries)
    if a:conn isnot s:link.conn
      return
    endif
    if entry.ref ==# '' && !entry.tracking && entry.status !=# 'removed'
      let entry.status = 'joining'
      call s:track(entry)
    endif
  endfor
endfunction

function! s:on_resume_reply(conn, tokens, leaving, reply) abort
  if a:conn isnot s:link.conn
    return
  endif
  let reply = a:reply
  if !reply.ok && reply.error.code ==# 'disconnected'
    " Closed before it answered (a connection accepted by a daemon that was
    " dying, say): the next connection resumes with the same tokens.
    call extend(s:orphans, a:leaving)
    return
  endif
  if !reply.ok
    " Not expected of a resume; start over with new entries.
    let reply = {'roles': {}, 'expired': a:tokens, 'resumed': [], 'refused': {}}
  endif
  " An entry updated while no connection held it has a new ref, which only
  " `refs` tells; take it before reading `roles`, which name the new one.
  for [token, ref] in items(get(reply, 'refs', {}))
    for entry in values(s:entries)
      if entry.token ==# token && entry.ref !=# ref
        call s:take_ref(entry, ref)
      endif
    endfor
  endfor
  " Entries someone removed while this editor was away: as a `removed`
  " event would have said, and never tracked again by themselves.
  for [token, removal] in items(get(reply, 'removed', {}))
    for entry in values(s:entries)
      if entry.token ==# token
        call s:removed(entry, removal)
      endif
    endfor
  endfor
  for [ref, standing] in items(reply.roles)
    let entry = get(s:by_ref, ref, {})
    if !empty(entry)
      " Unchanged roles say nothing: s:apply only speaks of changes.
      call s:set_standing(entry, s:standing_of(standing))
      call s:request(a:conn, {'op': 'subscribe', 'topic': entry.topic}, 0)
      " Saves made while the daemon was away are told now.
      if entry.meta_dirty
        call s:send_meta(entry)
      endif
    endif
  endfor
  for orphan in a:leaving
    " `refs` has the ref it has now (an update may have changed it).
    let ref = get(get(reply, 'refs', {}), orphan.token, orphan.ref)
    if index(reply.resumed, ref) >= 0
      call s:request(a:conn, {'op': 'untrack', 'topic': orphan.topic, 'ref': ref}, 0)
    endif
  endfor
  " Entries the daemon no longer has (expired), or would not give back
  " (refused): their place is lost, so they join at the end again.
  for token in reply.expired + keys(reply.refused)
    for entry in values(s:entries)
      if entry.token ==# token
        silent! call remove(s:by_ref, entry.ref)
        let entry.ref = ''
        let entry.token = ''
      endif
    endfor
  endfor
  call s:track_unjoined(a:conn)
endfunction

" Gets back everything after a (re)connect, as docs/protocol.md section 13
" says: resume every token, take the standings it gives, track again what
" the daemon no longer has, and subscribe again.
function! s:restore(conn) abort
  let tokens = []
  for entry in values(s:entries)
    if entry.token !=# ''
      call add(tokens, entry.token)
    endif
  endfor
  let leaving = s:orphans
  let s:orphans = []
  for orphan in leaving
    call add(tokens, orphan.token)
  endfor
  if empty(tokens)
    call s:track_unjoined(a:conn)
    return
  endif
  call s:request(a:conn, {'op': 'resume', 'tokens': tokens},
        \ function('s:on_resume_reply', [a:conn, tokens, leaving]))
endfunction

function! s:connected(conn) abort
  call s:stop_retrying()
  let s:link.conn = a:conn
  let s:link.state = 'up'
  let s:link.error = ''
  let s:link.reconnecting = 0
  " Whatever s:restore sends (perhaps nothing), this gets an answer from a
  " daemon that really serves us, which ends the outage (conn.answered).
  call s:request(a:conn, {'op': 'ping'}, 0)
  call s:restore(a:conn)
endfunction

" The daemon cannot be reached: every entry falls back to on_unreachable. A
" later buffer, or :PresenceReconnect, tries again.
function! s:unreachable(reason) abort
  call s:stop_retrying()
  let s:link.outage = {}
  let s:link.slow = 0
  let s:link.state = 'idle'
  let s:link.conn = {}
  let s:link.error = a:reason
  let s:link.reconnecting = 0
  for entry in values(s:entries)
    let entry.tracking = 0
    if entry.status !=# 'removed'
      let entry.status = 'unreachable'
      call s:apply_entry(entry)
    endif
  endfor
endfunction

" One attempt at connecting, for the try described by `try`: {generation,
" path, autostart, started (reltime), timeout_ms (0: a single attempt),
" reason, pause, started_daemon}. Failed attempts are repeated with growing
" pauses until timeout_ms has passed since `started`.
function! s:attempt(try, ...) abort
  if a:try.generation != s:link.generation || s:link.state ==# 'up'
    return
  endif
  let s:link.timer = -1
  let conn = s:open(a:try.path)
  if type(conn) == v:t_dict
    call s:connected(conn)
    return
  endif
  if a:try.autostart && s:opt('autostart', 1) && !a:try.started_daemon && s:worth_starting(conn)
    let a:try.started_daemon = 1
    call s:start_daemon(a:try.path, function('s:on_daemon_started', [a:try]))
    return
  endif
  call s:retry_or_give_up(a:try, conn)
endfunction

function! s:on_daemon_started(try, error) abort
  if a:try.generation != s:link.generation
    return
  endif
  if a:error ==# ''
    call s:attempt(a:try)
  elseif a:try.timeout_ms == 0
    call s:unreachable(a:error)
  else
    " Perhaps another editor is starting one: keep trying.
    call s:retry_or_give_up(a:try, a:error)
  endif
endfunction

function! s:retry_or_give_up(try, error) abort
  let left = a:try.timeout_ms - reltimefloat(reltime(a:try.started)) * 1000
  if left <= 0
    call s:unreachable(a:try.reason !=# '' ? a:try.reason . ', and it did not come back: ' . a:error : a:error)
    return
  endif
  let s:link.error = a:error
  " min() takes no Float in Vim 9.0.
  let pause = a:try.pause < left ? a:try.pause : float2nr(left)
  let s:link.timer = timer_start(pause, function('s:attempt', [a:try]))
  let a:try.pause = min([a:try.pause * 2, 500])
endfunction

function! s:connect() abort
  if s:link.state !=# 'idle'
    return
  endif
  let s:link.state = 'connecting'
  let s:link.generation += 1
  let s:link.outage = {}
  call s:attempt({'generation': s:link.generation, 'path': presenced#socket_path(),
        \ 'autostart': 1, 'started': reltime(), 'timeout_ms': 0, 'reason': '', 'pause': 50,
        \ 'started_daemon': 0})
endfunction

function! s:on_event(conn, message) abort
  if a:conn isnot s:link.conn
    return
  endif
  if a:message.event ==# 'role'
    let payload = a:message.payload
    let entry = get(s:by_ref, payload.ref, {})
    if !empty(entry)
      call s:set_standing(entry, s:standing_of(payload))
    endif
  elseif a:message.event ==# 'presence_state' || a:message.event ==# 'presence_diff'
    call s:on_presence_event(a:message)
  elseif a:message.event ==# 'removed'
    let entry = get(s:by_ref, a:message.payload.ref, {})
    if !empty(entry)
      call s:removed(entry, a:message.payload)
    endif
  elseif a:message.event ==# 'updated'
    " Someone else (root, say) changed the entry: it has a new ref and meta.
    let entry = get(s:by_ref, a:message.payload.prev_ref, {})
    if !empty(entry)
      call s:take_ref(entry, a:message.payload.ref)
      let meta = get(a:message.payload, 'meta', v:null)
      if type(meta) != v:t_dict
        return
      endif
      if entry.updating || entry.meta_dirty
        " What this editor set and has not seen through yet (a save, an
        " override) is kept: the update on its way fails on the old ref
        " and is sent again (s:on_update_reply), with it.
        for field in s:own_fields
          if has_key(entry.meta, field)
            let meta[field] = entry.meta[field]
          endif
        endfor
      endif
      let entry.meta = meta
    endif
  endif
  " `shutdown` is noted by s:on_line and handled when the connection closes.
endfunction

" The connection closed: keep every buffer as it is (the daemon keeps the
" places for a grace period) and get back within reconnect_timeout_ms.
function! s:on_close(conn) abort
  if a:conn isnot s:link.conn
    return
  endif
  let s:link.conn = {}
  let s:link.state = 'connecting'
  let s:link.reconnecting = 1
  let s:link.generation += 1
  for entry in values(s:entries)
    let entry.tracking = 0
  endfor
  let deliberate = a:conn.shutdown_reason !=# ''
  let reason = deliberate ? 'the daemon shut down (' . a:conn.shutdown_reason . ')'
        \ : a:conn.refusal !=# '' ? 'the daemon refused the connection (' . a:conn.refusal . ')'
        \ : 'the daemon closed the connection'
  " A connection that never got an answer does not end the outage: keep its
  " start, pauses and daemon start, or a daemon that accepts and at once
  " closes would be reconnected to in a loop that never stops.
  if a:conn.answered || empty(s:link.outage)
    let s:link.outage = {'started': reltime(), 'pause': 50, 'started_daemon': 0,
          \ 'timeout_ms': s:opt('reconnect_timeout_ms', 30000)}
  endif
  let try = s:link.outage
  call extend(try, {'generation': s:link.generation, 'path': presenced#socket_path(),
        \ 'autostart': !deliberate, 'reason': reason})
  if a:conn.answered
    call s:attempt(try)
  else
    call s:retry_or_give_up(try, reason)
  endif
endfunction

" Buffers ------------------------------------------------------------------

" Stops following a buffer; its entry leaves when it was the last buffer on
" the topic. The user's settings come back, since the buffer may be loaded
" again (after :bdelete) and must start from them.
function! presenced#detach(bufnr) abort
  let buf = get(s:buffers, a:bufnr, {})
  if empty(buf)
    return
  endif
  call s:unrestrict(a:bufnr)
  call remove(s:buffers, a:bufnr)
  let entry = get(s:entries, buf.topic, {})
  if empty(entry)
    return
  endif
  silent! call remove(entry.bufs, a:bufnr)
  if !empty(entry.bufs)
    return
  endif
  call remove(s:entries, buf.topic)
  call s:leave(entry)
endfunction

" Follows a buffer that was read or created. `wait` waits (up to
" g:presenced_join_wait_ms) for its role, so a spectator never looks
" editable. `opening`: called from SwapExists, before the buffer is loaded.
function! presenced#attach(bufnr, wait, ...) abort
  if !s:is_file_buffer(a:bufnr, a:0 && a:1)
    call presenced#detach(a:bufnr)
    return
  endif
  let [topic, path] = s:topic_of(a:bufnr)
  let buf = get(s:buffers, a:bufnr, {})
  if !empty(buf) && buf.topic ==# topic
    " Read again (:edit!, or the read after SwapExists): reading resets
    " 'modifiable' and 'readonly', and the buffer now holds the file.
    call s:record_read(a:bufnr)
    call s:apply(a:bufnr)
    return
  endif
  call presenced#detach(a:bufnr)
  if topic ==# ''
    return
  endif
  let s:buffers[a:bufnr] = {'topic': topic, 'saved': {}, 'last_message': '', 'read': {},
        \ 'swap_readonly': 0, 'reloading': 0, 'swap_found': ''}
  call s:record_read(a:bufnr)
  if has_key(s:entries, topic)
    let s:entries[topic].bufs[a:bufnr] = 1
    call s:apply(a:bufnr)
    return
  endif
  let entry = {'topic': topic, 'key': s:key_of(a:bufnr), 'meta': s:meta_of(a:bufnr, path),
        \ 'bufs': {a:bufnr: 1}, 'status': 'joining', 'metas': {}, 'ref': '', 'token': '',
        \ 'topic_owner': v:null, 'standing': {}, 'tracking': 0, 'left': 0, 'error': '',
        \ 'saves': 0, 'meta_dirty': 0, 'updating': 0, 'last_save': {}, 'removal': {}}
  let s:entries[topic] = entry
  call s:join(entry)
  let wait_ms = s:opt('join_wait_ms', 1500)
  if a:wait && wait_ms > 0 && !s:link.slow
    if !s:wait_until({-> entry.status !=# 'joining'}, wait_ms) && entry.status ==# 'joining'
      let s:link.slow = 1
    endif
  endif
endfunction

" A buffer was written to `file`: `:write NAME` names an unnamed buffer
" without BufFilePost, so a buffer not followed yet may have become a file.
" A write of its own file by the owner, or by :PresenceWrite! (the only
" way a spectator writes it), is told to the others with `update`: saved_at
" and saves in the meta, which spectators follow.
function! presenced#written(bufnr, file) abort
  let buf = get(s:buffers, a:bufnr, {})
  if empty(buf)
    call presenced#attach(a:bufnr, 1)
    return
  endif
  if !s:is_own_file(a:bufnr, a:file)
    return
  endif
  call s:record_read(a:bufnr)
  let entry = get(s:entries, buf.topic, {})
  if empty(entry)
    return
  endif
  " An override is counted whatever the entry's state: without a ref (no
  " daemon, or removed) s:send_meta sends it once there is one.
  let owning = entry.status ==# 'joined' && entry.standing.role ==# 'owner'
  if s:overriding != a:bufnr && !owning
    return
  endif
  let entry.saves += 1
  let entry.meta.saved_at = s:now_ms()
  let entry.meta.saves = entry.saves
  call s:send_meta(entry)
endfunction

function! s:is_own_file(bufnr, file) abort
  return a:file !=# '' && s:resolve_path(a:file) ==# s:resolve_path(bufname(a:bufnr))
endfunction

" What a refused write says. `since` is when the owner joined.
function! s:refusal(bufnr) abort
  let entry = s:entries[s:buffers[a:bufnr].topic]
  let name = s:display_name(a:bufnr)
  let what_to_do = ':PresenceWrite! to save anyway, or :w other-name'
  if entry.status ==# 'joined' && get(entry.standing, 'suspended', 0)
    return printf('presenced: %s: %s, so your copy is read-only until it returns. %s',
          \ name, s:suspended, what_to_do)
  elseif entry.status ==# 'joined' && type(get(entry.standing, 'owner', v:null)) == v:t_dict
    let owner = entry.standing.owner
    return printf('presenced: %s is being edited by %s since %s; your copy is read-only. %s',
          \ name, s:who(owner), s:clock(owner.joined_at), what_to_do)
  elseif entry.status ==# 'removed'
    let by = get(entry.removal, 'by', {})
    return printf('presenced: %s: removed by %s (uid %s, pid %s); your copy is read-only. :PresenceJoin to queue again, %s',
          \ name, get(by, 'user', '?'), get(by, 'uid', '?'), get(by, 'pid', '?'), what_to_do)
  endif
  return printf('presenced: %s: the daemon cannot say who is editing it, so your copy is read-only until it answers. %s',
        \ name, what_to_do)
endfunction

" The write guard, on BufWritePre, FileWritePre and FileAppendPre: a
" read-only buffer is never written to its own file, bang or not; to any
" other file it is. interrupt() stops the write (and a :wq or :x with it)
" without the "Exception not caught" lines a :throw would print around
" the message; in a script's :try it is caught as "Vim:Interrupt", with
" the message in v:errmsg.
function! presenced#guard(bufnr, file) abort
  let buf = get(s:buffers, a:bufnr, {})
  if empty(buf) || empty(buf.saved) || s:overriding == a:bufnr || !s:is_own_file(a:bufnr, a:file)
    return
  endif
  let message = s:refusal(a:bufnr)
  echohl ErrorMsg
  echomsg message
  echohl None
  let v:errmsg = message
  call interrupt()
endfunction

" :PresenceWrite!: writes a read-only buffer over its file after asking,
" and first records it in the entry's meta (`overrode`), which `presence
" log` shows as an update. Without the bang it says what the bang would do.
function! presenced#write_anyway(bang) abort
  let bufnr = bufnr('%')
  let buf = get(s:buffers, bufnr, {})
  if empty(buf) || empty(buf.saved)
    " Nobody else holds it: an ordinary write.
    execute 'write' . (a:bang ? '!' : '')
    return
  endif
  let entry = s:entries[buf.topic]
  let name = s:display_name(bufnr)
  let owner = entry.status ==# 'joined' ? get(entry.standing, 'owner', v:null) : v:null
  if entry.status ==# 'joined' && get(entry.standing, 'suspended', 0)
    " Named owner, but it is this editor: nobody else holds the file.
    let owner = v:null
  endif
  if entry.status ==# 'removed'
    let owner = s:owner_after_removal(entry)
  endif
  let whose = type(owner) == v:t_dict ? s:who(owner) : 'another editor'
  if !a:bang
    echohl ErrorMsg
    echomsg printf('presenced: %s is being edited by %s; :PresenceWrite! (with !) writes your copy over theirs', name, whose)
    echohl None
    return
  endif
  let question = type(owner) == v:t_dict
        \ ? printf('presenced: %s is editing %s. Write your copy over it anyway?', whose, name)
        \ : printf('presenced: nobody is known to own %s now. Write your copy over it anyway?', name)
  let Confirm = get(g:, 'Presenced_confirm', 0)
  if type(Confirm) == v:t_func
    let yes = Confirm(question)
  else
    let yes = confirm(question, "&Yes\n&No", 2) == 1
  endif
  if !yes
    call s:notify(name . ': not written', 'info')
    return
  endif
  " Logged before the write, whoever owns the file. Without a connection
  " it is sent after the resume, and without an entry (removed) with the
  " next :PresenceJoin (s:send_meta), so only a live one is waited for.
  let entry.meta.overrode = {'at': s:now_ms()}
  if type(owner) == v:t_dict
    call extend(entry.meta.overrode, {'owner': owner.key, 'owner_pid': owner.pid})
  endif
  call s:send_meta(entry)
  if s:link.state ==# 'up' && entry.ref !=# ''
    call s:wait_until({-> !entry.updating && !entry.meta_dirty}, s:opt('join_wait_ms', 1500))
  endif
  let s:overriding = bufnr
  try
    write!
  finally
    let s:overriding = -1
  endtry
  call s:notify(printf('%s: written over the copy of %s', name, whose), 'warn')
endfunction

" :PresenceJoin: queues again (at the end) for a buffer whose entry was
" removed or refused, or tries the daemon again if it could not be reached.
function! presenced#join_again() abort
  let bufnr = bufnr('%')
  let buf = get(s:buffers, bufnr, {})
  if empty(buf)
    call presenced#attach(bufnr, 1)
    return
  endif
  let entry = s:entries[buf.topic]
  if entry.status ==# 'removed' || entry.status ==# 'refused'
    let entry.removal = {}
    let entry.error = ''
    call s:join(entry)
    let buf.last_message = ''
    call s:wait_until({-> entry.status !=# 'joining'}, s:opt('join_wait_ms', 1500))
  elseif entry.status ==# 'unreachable'
    call s:connect()
  else
    call s:notify(s:display_name(bufnr) . ': already on ' . entry.topic . ': ' . presenced#status(), 'info')
  endif
endfunction

" Whether another editor holds the entry's file: this one is a spectator,
" or its entry was removed.
function! s:is_guarded(entry) abort
  return !empty(a:entry) && (a:entry.status ==# 'removed'
        \ || (a:entry.status ==# 'joined' && a:entry.standing.role !=# 'owner'))
endfunction

" SwapExists: Vim found a swap file for the file being opened. The plugin
" joins the topic first (waiting as at open). If another editor owns the
" file, the buffer is opened read-only without asking, and presenced's
" message says who edits it. If this editor owns it (the swap file is left
" by a crash, or by an editor presenced does not know), Vim asks as usual:
" recovering is then the user's call. But not while the plugin reads the
" file again (s:reload, from a channel callback or timer, where a question
" has no place): the swap file is then the previous owner's, killed with
" changes it had not saved, and the buffer is read anyway; where that
" swap file is, for :recover, is said after the read.
function! presenced#swap_exists(bufnr, file) abort
  let bufnr = a:bufnr > 0 ? a:bufnr : bufnr('%')
  let buf = get(s:buffers, bufnr, {})
  if !empty(buf) && buf.reloading
    let entry = get(s:entries, buf.topic, {})
    if !s:is_guarded(entry)
      let v:swapchoice = 'e'
      let buf.swap_found = fnamemodify(v:swapname, ':p')
      return
    endif
  endif
  call presenced#attach(bufnr, 1, 1)
  let buf = get(s:buffers, bufnr, {})
  let entry = empty(buf) ? {} : get(s:entries, buf.topic, {})
  if s:is_guarded(entry)
    let v:swapchoice = 'o'
    let buf.swap_readonly = 1
    " The message about reading the file comes after the standing's.
    if buf.last_message !=# ''
      call s:echo_later(buf.last_message, 'WarningMsg')
    endif
  endif
endfunction

" BufWinEnter of a buffer with b:presenced_stale: it should have read its
" file again while no window showed it (s:reload), and does it now.
function! presenced#shown(bufnr) abort
  call setbufvar(a:bufnr, 'presenced_stale', 0)
  if has_key(s:buffers, a:bufnr) && !getbufvar(a:bufnr, '&modified')
    call timer_start(0, {-> s:reload(a:bufnr)})
  endif
endfunction

" A buffer was unloaded (:bunload, or :edit of another file without
" 'hidden'): it is no longer open, so it leaves its topic. Looked at later,
" since :edit! unloads a buffer only to read it again at once.
function! presenced#unloaded(bufnr) abort
  if has_key(s:buffers, a:bufnr)
    call timer_start(0, {-> s:leave_if_unloaded(a:bufnr)})
  endif
endfunction

function! s:leave_if_unloaded(bufnr) abort
  if has_key(s:buffers, a:bufnr) && !bufloaded(a:bufnr)
    call presenced#detach(a:bufnr)
  endif
endfunction

" Leaves every topic and waits a little for the daemon to confirm, so the
" next in line is promoted by a clean `untrack`.
function! presenced#leave_all() abort
  let s:link.generation += 1
  call s:stop_retrying()
  let conn = s:link.conn
  let connected = !empty(conn) && conn.open
  if connected
    " An update on its way changes its entry's ref: untrack by the new one.
    " (A write just before quitting, as :wq does, sends one.)
    let entries = values(s:entries)
    for entry in entries
      let entry.meta_dirty = 0
    endfor
    call s:wait_until({-> empty(filter(copy(entries), 'v:val.updating'))}, s:opt('leave_wait_ms', 500))
  endif
  for entry in values(s:entries)
    if connected && entry.ref !=# ''
      call s:request(conn, {'op': 'untrack', 'topic': entry.topic, 'ref': entry.ref}, 0)
    endif
  endfor
  let s:entries = {}
  let s:buffers = {}
  let s:by_ref = {}
  let s:orphans = []
  let s:link.state = 'idle'
  let s:link.conn = {}
  let s:link.outage = {}
  if connected
    call s:wait_until({-> empty(conn.pending)}, s:opt('leave_wait_ms', 500))
    call s:close(conn)
  endif
endfunction

" Public functions ---------------------------------------------------------

" What the plugin knows of a buffer (default: the current one), or {} for a
" buffer it does not follow.
function! presenced#state(...) abort
  let bufnr = a:0 && a:1 ? a:1 : bufnr('%')
  let buf = get(s:buffers, bufnr, {})
  if empty(buf) || !has_key(s:entries, buf.topic)
    return {}
  endif
  let entry = s:entries[buf.topic]
  let joined = entry.status ==# 'joined'
  " As the daemon last said: it sends a role event whenever it changes.
  let position = joined ? entry.standing.position : v:null
  return {'topic': entry.topic, 'key': entry.key, 'status': entry.status,
        \ 'role': joined ? entry.standing.role : v:null,
        \ 'position': position,
        \ 'suspended': joined ? get(entry.standing, 'suspended', 0) : 0,
        \ 'owner': joined ? entry.standing.owner : v:null,
        \ 'ref': entry.ref,
        \ 'error': entry.status ==# 'refused' ? entry.error : s:link.error,
        \ 'connection': s:link.reconnecting ? 'reconnecting' : s:link.state,
        \ 'socket': presenced#socket_path(),
        \ 'restricted': !empty(buf.saved)}
endfunction

" A short text for the statusline or 'titlestring': `owner`, `owner, 2
" watching`, `spectator #1 (owner: alice, pid 4242)`, `suspended (etcd
" unreachable)`, or '' for buffers not followed.
function! presenced#status(...) abort
  let state = call('presenced#state', a:000)
  if empty(state)
    return ''
  endif
  if state.status ==# 'joined'
    if state.role ==# 'owner'
      let watching = len(s:entries[state.topic].metas) - 1
      let text = watching > 0 ? printf('owner, %d watching', watching) : 'owner'
    elseif state.suspended
      let text = 'suspended (etcd unreachable)'
    else
      let owner = type(state.owner) == v:t_dict ? state.owner : {'key': '?', 'pid': '?'}
      let text = printf('spectator #%d (owner: %s, pid %s)', state.position, owner.key, owner.pid)
    endif
  elseif state.status ==# 'joining'
    let text = 'joining'
  elseif state.status ==# 'unreachable'
    let text = 'no daemon'
  elseif state.status ==# 'removed'
    let text = 'removed (:PresenceJoin to queue again)'
  else
    let text = 'not tracked'
  endif
  if state.connection ==# 'reconnecting'
    let text .= ', reconnecting'
  endif
  return text
endfunction

" Who is on the buffer's topic, in the order they joined: a list of {key,
" pid, user, editor, role, position, you, suspended}. The owner is the one
" the daemon names; `position` is known for the owner (0) and for this
" editor (its standing), v:null for the others. This editor's entry, when
" it is the owner held back while the daemon cannot reach etcd, is the
" owner with `suspended` set.
function! presenced#who(...) abort
  let state = call('presenced#state', a:000)
  if empty(state)
    return []
  endif
  let entry = s:entries[state.topic]
  let owner = type(state.owner) == v:t_dict ? state.owner : entry.topic_owner
  let list = []
  for meta in s:in_join_order(entry)
    let you = meta.phx_ref ==# state.ref
    let owns = state.role is# 'owner' ? you : s:same_entry(meta, owner)
    let position = owns ? 0 : you ? state.position : v:null
    call add(list, {'key': meta.key, 'pid': meta.pid, 'user': meta.user,
          \ 'editor': get(meta, 'editor', ''), 'role': owns ? 'owner' : 'spectator',
          \ 'position': position, 'you': you, 'suspended': you && state.suspended})
  endfor
  return list
endfunction

function! presenced#print_status() abort
  let state = presenced#state()
  if empty(state)
    call s:notify(printf('this buffer is not on any topic (daemon socket: %s, %s)',
          \ presenced#socket_path(), s:link.state), 'info')
    return
  endif
  echomsg printf('presenced: %s: %s', s:display_name(bufnr('%')), presenced#status())
  echomsg printf('  topic %s, key %s, ref %s', state.topic, state.key,
        \ state.ref !=# '' ? state.ref : 'none')
  echomsg printf('  daemon %s: %s%s', state.socket, state.connection,
        \ state.error !=# '' ? ' (' . state.error . ')' : '')
endfunction

function! presenced#print_who() abort
  let state = presenced#state()
  if empty(state)
    call s:notify('this buffer is not on any topic', 'info')
    return
  endif
  let list = presenced#who()
  if empty(list)
    call s:notify(printf('nobody known on %s yet (%s)', state.topic, presenced#status()), 'info')
    return
  endif
  echomsg printf('presenced: on %s:', state.topic)
  for person in list
    echomsg printf('  %-12s %s (pid %s)%s%s',
          \ person.suspended ? 'suspended'
          \   : person.role ==# 'owner' ? 'owner'
          \   : type(person.position) == v:t_number ? 'spectator #' . person.position : 'spectator',
          \ person.key, person.pid, person.editor !=# '' ? ', ' . person.editor : '',
          \ person.you ? ', you' : '')
  endfor
endfunction

" :PresenceReconnect: try the daemon again after it could not be reached.
function! presenced#reconnect() abort
  call s:connect()
endfunction

let &cpoptions = s:save_cpo
unlet s:save_cpo
