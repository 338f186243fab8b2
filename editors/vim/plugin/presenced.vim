" presenced: one editable buffer per file across editors on this machine.
" The first editor to open a file owns it; every later one gets the buffer
" 'nomodifiable', and no write of it to its file goes through, until the
" owner goes. See :help presenced.
" The work is in autoload/presenced.vim, loaded when a file is opened.

if exists('g:loaded_presenced')
  finish
endif
let g:loaded_presenced = 1

" Channels on Unix sockets ("unix:" in ch_open) came with 8.2.4684.
if !has('channel') || !has('patch-8.2.4684')
  echohl WarningMsg
  echomsg 'presenced: needs Vim 8.2.4684 or newer with +channel'
  echohl None
  finish
endif

command! -bar PresenceStatus call presenced#print_status()
command! -bar PresenceWho call presenced#print_who()
command! -bar PresenceReconnect call presenced#reconnect()
command! -bar -bang PresenceWrite call presenced#write_anyway(<bang>0)
command! -bar PresenceJoin call presenced#join_again()

augroup presenced
  autocmd!
  autocmd BufReadPost,BufNewFile,BufFilePost * call presenced#attach(str2nr(expand('<abuf>')), 1)
  autocmd BufWritePost * call presenced#written(str2nr(expand('<abuf>')), expand('<afile>'))
  " The write guard. An exception or interrupt here stops the write, bang
  " or not, and a refused :wq or :x then does not quit. Whole-buffer
  " writes, ranges and appends each have their own event.
  autocmd BufWritePre,FileWritePre,FileAppendPre * call presenced#guard(str2nr(expand('<abuf>')), expand('<afile>'))
  autocmd SwapExists * call presenced#swap_exists(str2nr(expand('<abuf>')), expand('<afile>'))
  " A buffer that missed a reload while hidden reads its file when shown.
  autocmd BufWinEnter * if get(b:, 'presenced_stale', 0) | call presenced#shown(str2nr(expand('<abuf>'))) | endif
  autocmd BufDelete,BufWipeout * call presenced#detach(str2nr(expand('<abuf>')))
  autocmd BufUnload * call presenced#unloaded(str2nr(expand('<abuf>')))
  autocmd VimLeavePre * call presenced#leave_all()
augroup END

" Files loaded before this script was sourced (a plugin manager loading it
" late) are followed too. At an ordinary start there are none yet.
for s:info in getbufinfo({'bufloaded': 1})
  if s:info.name !=# ''
    call presenced#attach(s:info.bufnr, 1)
  endif
endfor
unlet! s:info
