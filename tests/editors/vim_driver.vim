" Lets tests/editors.rs query a batch-mode Vim (vim -Nu NONE -i NONE -es),
" or one in a terminal, the way it queries Neovim with --remote-expr: this
" Vim has no clientserver, so requests come as files in g:driver_dir. The
" loop starts once Vim has opened its file: a Vim stopped at a question
" (the swap file's) answers nothing.
"
" The test writes an expression to request-N.tmp and renames it to
" request-N (so it is never read half written); the driver evaluates it
" and answers the same way, in response-N, with {"ok": value} or
" {"error": "Vim(...):E..."}. Between requests it sleeps 10 ms: :sleep is
" also where Vim runs the plugin's channel callbacks and timers.
"
" An expression may quit Vim (execute('qall!')); nothing is answered then.
" Commands whose messages a test reads run as execute(CMD, ''), not
" silently: a silent :echomsg is not kept in :messages.

let s:next = 0
while 1
  let s:request = g:driver_dir . '/request-' . s:next
  if filereadable(s:request)
    let s:expression = join(readfile(s:request), "\n")
    try
      let s:answer = {'ok': eval(s:expression)}
    catch
      let s:answer = {'error': v:exception}
    endtry
    let s:response = g:driver_dir . '/response-' . s:next
    call writefile([json_encode(s:answer)], s:response . '.tmp')
    call rename(s:response . '.tmp', s:response)
    let s:next += 1
  else
    sleep 10m
  endif
endwhile
