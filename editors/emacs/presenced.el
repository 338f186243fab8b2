;;; presenced.el --- Share a file with other editors, one owner at a time -*- lexical-binding: t; -*-

;; Copyright (C) 2025 The presenced authors

;; Version: 0.1.0
;; Package-Requires: ((emacs "27.1"))
;; URL: https://crates.io/crates/presenced
;; Keywords: files, tools, convenience
;; SPDX-License-Identifier: MIT OR Apache-2.0

;; This file is not part of GNU Emacs.

;;; Commentary:

;; presenced is a presence daemon for one machine: editors and scripts
;; join a topic on its Unix socket, the first to join owns the topic
;; and may edit, and everyone after is a spectator, queued in join
;; order, until the owner goes.  This package makes Emacs one of those
;; editors, alongside the Neovim and Vim plugins in the same
;; repository: two people never save over each other's work.
;;
;; Setup: put this file in a folder on `load-path', have the `presence'
;; program on PATH (or set `presenced-program'), and turn on the global
;; minor mode:
;;
;;   (require 'presenced)
;;   (presenced-mode 1)
;;
;; What it does, while `presenced-mode' is on:
;;
;; - Every buffer visiting a local file joins the file's topic when it
;;   is visited, or when it is given a file name (`write-file',
;;   `set-visited-file-name'): by default `file:' and the file's
;;   absolute path with symbolic links resolved (for a file that does
;;   not exist yet, its folder's resolved path and its name), the
;;   convention every presenced editor plugin and `presence who FILE'
;;   use.  `presenced-topic-function' may choose another topic, or none.
;;
;; - The package talks to the daemon's socket itself, one connection
;;   for the whole Emacs, found as the `presence' CLI finds it: the
;;   option `presenced-socket', else PRESENCE_SOCKET, else
;;   $XDG_RUNTIME_DIR/presenced/presenced.sock, else
;;   /tmp/presenced-UID/presenced.sock.  Before every connection it
;;   checks the socket's folder as docs/protocol.md §1 asks (a real
;;   folder, not a link, that nobody but its owner may write to, owned
;;   by you, root, or a shared daemon's user whose folders lead up to
;;   one of root's), and looks again after connecting, before sending
;;   anything.  When no daemon answers it starts one with `presence
;;   --socket=PATH list --json'.
;;
;; - Visiting a file waits briefly (`presenced-join-wait') for the
;;   daemon's answer, so a spectator's buffer never looks editable.  A
;;   spectator's buffer is read-only (`read-only-mode') and the mode
;;   line names the owner, for example
;;   "presenced[spectator #1 (owner: alice, pid 4242)]"; the function
;;   `presenced-status' gives that text for your own mode line.  An
;;   owner of a topic a daemon shares across hosts is read-only too
;;   while that daemon cannot reach etcd: "presenced[suspended (etcd
;;   unreachable)]", until it can.
;;
;; - A spectator cannot save the file: `save-buffer', `write-file' to
;;   the same file, `save-some-buffers', and `write-region' or
;;   `append-to-file' to it (from any buffer) fail with
;;
;;     presenced: notes.md is being edited by alice (pid 4242) since
;;     10:02; your copy is read-only.  M-x presenced-write-anyway to
;;     save anyway, or C-x C-w to write another file
;;
;;   and leave the buffer as it was: read-only, and modified if it
;;   has changes of its own.
;;   Writing the buffer to another file works.  `presenced-write-anyway'
;;   asks first (through `presenced-confirm-function'), records the
;;   override in the entry's meta (`overrode'), so that `presence log'
;;   shows it, and then writes.  The same goes for a buffer whose entry
;;   was removed, and for one kept read-only while the daemon cannot
;;   be reached (`presenced-on-unreachable').  What does not go through
;;   `write-region' is not guarded: `copy-file' or `rename-file' onto
;;   the file, or another program (a shell command, say) writing it.
;;
;; - After each save as owner, and after `presenced-write-anyway', the
;;   entry's meta says when (`saved_at', milliseconds) and how many
;;   times (`saves'); spectators, on seeing any other entry's
;;   `saved_at' change, read the file again, keeping point and the
;;   window's view, so an override is followed like the owner's saves.
;;   The owner is not reloaded: Emacs warns it at its next save that
;;   the file changed on disk.  When the owner goes, the next in line is
;;   promoted: its buffer becomes editable, and is first read again
;;   from disk if the file changed since it was read, so it never saves
;;   stale text.
;;
;; - If the daemon restarts or crashes, buffers keep their places: the
;;   package connects again and resumes its entries with the daemon's
;;   tokens (docs/protocol.md §13).  An entry that another user (root,
;;   say) removed makes the buffer read-only; `presenced-join' queues it
;;   again.
;;
;; - Killing a buffer leaves its topic; quitting Emacs leaves them all.
;;
;; `presenced-state' returns what the package knows of a buffer, for
;; scripts and tests.

;;; Code:

(require 'cl-lib)
(require 'seq)
(require 'subr-x)

(defgroup presenced nil
  "One editable copy of a file across editors, through presenced."
  :group 'files
  :prefix "presenced-")

(defcustom presenced-socket nil
  "The daemon's socket, or nil to find it as the `presence' CLI does.
The CLI uses PRESENCE_SOCKET, else $XDG_RUNTIME_DIR/presenced/presenced.sock,
else /tmp/presenced-UID/presenced.sock."
  :type '(choice (const :tag "As the CLI finds it" nil) file))

(defcustom presenced-program "presence"
  "The presence program, run to start a daemon when none answers."
  :type 'string)

(defcustom presenced-autostart t
  "Whether to start a daemon when none answers.
Never done after the daemon said it was shutting down: whoever
stopped it will start it again."
  :type 'boolean)

(defcustom presenced-topic-function #'presenced-file-topic
  "Function giving the topic of a file buffer.
It is called in the buffer with the file's absolute path, symbolic
links resolved, and returns the topic, or nil or \"\" to leave the
buffer alone."
  :type 'function)

(defcustom presenced-key nil
  "Who you are on a topic, or nil for your login name."
  :type '(choice (const :tag "Login name" nil) string))

(defcustom presenced-on-unreachable 'editable
  "What a buffer does when the daemon cannot be reached.
`editable' leaves it editable, with a warning; `read-only' makes it
read-only until the daemon answers."
  :type '(choice (const editable) (const read-only)))

(defcustom presenced-join-wait 1.5
  "Seconds that visiting a file waits for its role.
So that a spectator never looks editable; past it the role arrives
later.  When a wait runs out, later files do not wait until the
daemon answers again."
  :type 'number)

(defcustom presenced-leave-wait 0.5
  "Seconds that quitting Emacs waits for the daemon to confirm the leaves."
  :type 'number)

(defcustom presenced-reconnect-timeout 30
  "Seconds to keep trying to get back to a daemon that went away."
  :type 'number)

(defcustom presenced-confirm-function #'yes-or-no-p
  "Function asking the user a yes-or-no question; non-nil means yes.
`presenced-write-anyway' asks through it before writing over the
owner's file."
  :type 'function)

;;;; State

(cl-defstruct (presenced--entry (:constructor presenced--make-entry)
                                (:copier nil))
  "What this Emacs holds on one topic, shared by the buffers on it."
  topic key meta buffers
  ;; `joining', `joined', `unreachable', `refused' or `removed'.
  status
  ;; The refusal of a `track', or the `removed' event's payload.
  error removed-by
  ;; The last standing heard: a hash table of role, readonly, position, owner.
  standing
  ref token
  ;; The topic's entries from the subscription, ref -> meta (with "key").
  (metas (make-hash-table :test #'equal))
  ;; The topic's owner, from the subscription's events.
  topic-owner
  ;; (KEY . SAVED-AT) of the latest save by another entry heard of:
  ;; the owner's, or a spectator's `presenced-write-anyway'.
  last-save
  ;; This editor's writes of the file while on the topic, the meta's
  ;; `saves': its own count, which an `updated' event does not reset.
  (saves 0)
  ;; Fields this editor set in the meta that no successful `update'
  ;; has carried yet, name -> value: a meta an `updated' event brings
  ;; gets them again, so an update of ours that raced it is not lost.
  (unconfirmed (make-hash-table :test #'equal))
  tracking left updating update-again meta-dirty)

(cl-defstruct (presenced--buffer (:constructor presenced--make-buffer)
                                 (:copier nil))
  "What the package keeps of a followed buffer."
  topic path
  ;; Whether the buffer is kept read-only by the package, and the
  ;; `buffer-read-only' it had before, given back on promotion.
  restricted saved-read-only
  ;; The file's size and modification time, and the buffer's
  ;; `buffer-chars-modified-tick', when the buffer last read or wrote
  ;; the file.
  read-size read-modtime read-tick
  last-message)

(defvar presenced--buffers (make-hash-table :test #'eq :weakness 'key)
  "Followed buffers: buffer -> `presenced--buffer'.")

(defvar presenced--entries (make-hash-table :test #'equal)
  "Entries held: topic -> `presenced--entry'.")

(defvar presenced--by-ref (make-hash-table :test #'equal)
  "Entries by their current ref, to route events naming a ref.")

(defvar presenced--orphans nil
  "Entries left while disconnected, as (TOKEN REF TOPIC).
Resumed on the next connection only to be untracked, so that the
next in line need not wait for the daemon's grace period to end.")

(defvar presenced--process nil
  "The connection to the daemon, when there is one.")

(defvar presenced--link-state 'idle
  "`idle' (not connected, not trying), `connecting' or `up'.")

(defvar presenced--generation 0
  "Bumped by every new try and by quitting.
A callback of an older try sees it changed and does nothing.")

(defvar presenced--link-error nil
  "Why the daemon could not be reached.")

(defvar presenced--reconnecting nil
  "Non-nil while getting back after the connection closed.")

(defvar presenced--retry-timer nil
  "The timer of the next connection attempt.")

(defvar presenced--outage nil
  "The current spell without a working connection, a plist.
:deadline (a `float-time'), :pause (seconds), :started-daemon.  A
connection the daemon closes before answering anything does not
end it, so that such closes cannot restart the deadline forever.")

(defvar presenced--slow nil
  "Non-nil when a wait for a role ran out.
Later buffers do not wait again until the daemon answers.")

(defvar presenced--saving nil
  "The buffer whose save `basic-save-buffer' is doing, past the guard.
Its own writes of its file are the save itself.")

(defvar presenced--writing-anyway nil
  "Non-nil while `presenced-write-anyway' writes past the guard.")

;; Per connection.
(defvar presenced--pending (make-hash-table :test #'eql)
  "Requests waiting for their reply: id -> callback or t.")
(defvar presenced--next-id 0 "The id of the last request sent.")
(defvar presenced--partial "" "Bytes received after the last newline.")
(defvar presenced--answered nil "Whether the daemon answered a request.")
(defvar presenced--shutdown-reason nil "The reason of a `shutdown' event.")
(defvar presenced--refusal nil "An error the daemon sent with a null id.")
(defvar presenced--checked-folder nil
  "(FOLDER . ATTRIBUTES) of the socket's folder as checked before connecting.")

;;;; Helpers

(defun presenced--get (object &rest keys)
  "The value at KEYS in OBJECT, nested hash tables from JSON, or nil."
  (while (and keys (hash-table-p object))
    (setq object (gethash (pop keys) object)))
  (and (null keys) object))

(defun presenced--now-ms ()
  "Milliseconds since the Unix epoch."
  (floor (* 1000 (float-time))))

(defun presenced--clock (ms)
  "MS, milliseconds since the epoch, as HH:MM in local time."
  (if (numberp ms)
      (format-time-string "%H:%M" (/ ms 1000.0))
    "?"))

(defun presenced--say (format-string &rest args)
  "Show FORMAT-STRING with ARGS, prefixed by \"presenced: \"."
  (let ((text (concat "presenced: " (apply #'format-message format-string args))))
    (message "%s" text)
    text))

(defun presenced--say-visibly (format-string &rest args)
  "Like `presenced--say' with FORMAT-STRING and ARGS, and say it again later.
What visiting a file prints after its hooks (or a client's help
text) would otherwise hide it at once; the repeat is not logged."
  (let ((text (apply #'presenced--say format-string args)))
    (run-with-idle-timer
     0.2 nil
     (lambda ()
       (unless (equal (current-message) text)
         (let ((message-log-max nil))
           (message "%s" text)))))
    text))

(defun presenced--login ()
  "The login name."
  (or (user-login-name) (number-to-string (user-uid))))

(defun presenced-socket-path ()
  "Find the daemon's socket as the `presence' CLI does, as an absolute path.
A relative path is taken from the folder Emacs started in, where
the CLI started beside it would look, not from the current
buffer's `default-directory': so the folder checked, the socket
connected to and the one a started daemon serves are one."
  (let* ((from-env (getenv "PRESENCE_SOCKET"))
         (runtime (getenv "XDG_RUNTIME_DIR"))
         (start (file-name-as-directory
                 (expand-file-name (or command-line-default-directory
                                       default-directory)))))
    (cond ((and presenced-socket (not (string-empty-p presenced-socket)))
           ;; Written in Emacs: `~' is the home folder here.
           (expand-file-name presenced-socket start))
          (t
           ;; As the CLI reads it: a path, where `~' is only a name.
           (let ((path (cond ((and from-env (not (string-empty-p from-env))) from-env)
                             ((and runtime (not (string-empty-p runtime)))
                              (concat (file-name-as-directory runtime)
                                      "presenced/presenced.sock"))
                             (t (format "/tmp/presenced-%d/presenced.sock" (user-uid))))))
             ;; Made absolute first, so that `~' is never read as home.
             (expand-file-name (if (string-prefix-p "/" path) path (concat start path))))))))

(defun presenced-resolve-file (file)
  "FILE's absolute path with symbolic links resolved.
For a file that does not exist yet: its folder's resolved path and
its name."
  (let ((full (expand-file-name file)))
    ;; A dangling link is followed to the file a write through it
    ;; would create; a circle of links has no file to name.
    (if (or (file-exists-p full) (file-symlink-p full))
        (condition-case nil (file-truename full) (error full))
      (concat (file-name-as-directory
               (file-truename (file-name-directory full)))
              (file-name-nondirectory full)))))

(defun presenced-file-topic (path)
  "The topic of the file at PATH: `file:' and PATH.
PATH is absolute with symbolic links resolved.  The default
`presenced-topic-function', and the convention of every presenced
editor plugin and of `presence who'."
  (concat "file:" path))

(defun presenced--editor-name ()
  "This editor, as the meta's `editor' names it."
  (format "emacs %d.%d" emacs-major-version emacs-minor-version))

(defun presenced--display-name (buffer)
  "BUFFER's file as messages name it.
Relative to the folder Emacs started in when under it, as Neovim
and Vim name it, else abbreviated."
  (let* ((file (buffer-file-name buffer))
         (start (and command-line-default-directory
                     (file-name-as-directory
                      (expand-file-name command-line-default-directory)))))
    (cond ((null file) (buffer-name buffer))
          ((and start (string-prefix-p start file))
           (substring file (length start)))
          (t (abbreviate-file-name file)))))

(defun presenced--who (owner)
  "`KEY (pid PID)' of OWNER, a hash table, as the CLI names an owner."
  (if (hash-table-p owner)
      (format "%s (pid %s)" (gethash "key" owner) (gethash "pid" owner))
    "nobody"))

(defun presenced--file-size (file)
  "FILE's size in bytes, or nil if it cannot be read."
  (let ((attributes (and file (file-attributes file))))
    (and attributes (file-attribute-size attributes))))

;;;; The socket's folder

(defun presenced--folder-of (path)
  "The folder holding PATH: \".\" for a bare name, \"/\" for the root."
  (let ((folder (file-name-directory path)))
    (if folder (directory-file-name folder) ".")))

(defun presenced--others-may-write (attributes)
  "Whether group or others may write to the file of ATTRIBUTES."
  (let ((modes (file-attribute-modes attributes)))
    (or (eq (aref modes 5) ?w) (eq (aref modes 8) ?w))))

(defun presenced--untrusted (format-string &rest args)
  "A refusal to connect: FORMAT-STRING with ARGS, why."
  (concat "not trusted, nothing sent: " (apply #'format format-string args)))

(defun presenced--distrust (folder attributes)
  "Why FOLDER, whose own ATTRIBUTES are given, may not be trusted, or nil.
It must be a folder nobody but its owner may write to, owned by
you, root, or a shared daemon's user: one whose folders lead up to
one of root's (or yours) that nobody else may write to."
  (let ((me (user-uid))
        (owner (file-attribute-user-id attributes)))
    (cond
     ((presenced--others-may-write attributes)
      (presenced--untrusted
       "its folder %s, of uid %d, may be written by group or others, so anyone could have put that socket there"
       folder owner))
     ((memql owner (list me 0)) nil)
     (t
      (let ((above (file-truename folder))
            (why nil)
            (done nil))
        (if (not (file-name-absolute-p above))
            (presenced--untrusted
             "its folder %s belongs to uid %d, and where it lies cannot be found"
             folder owner)
          (while (and (not done) (not (equal above "/")))
            (setq above (presenced--folder-of above))
            (let ((up (file-attributes above 'integer)))
              (cond
               ((null up)
                (setq done t
                      why (presenced--untrusted
                           "cannot look at %s, above its folder %s of uid %d"
                           above folder owner)))
               ((presenced--others-may-write up)
                (setq done t
                      why (presenced--untrusted
                           "its folder %s belongs to uid %d, not to you or root, and lies under %s, which others may write to, so anyone could have made it"
                           folder owner above)))
               ((memql (file-attribute-user-id up) (list me 0))
                (setq done t))
               ((not (eql (file-attribute-user-id up) owner))
                (setq done t
                      why (presenced--untrusted
                           "its folder %s belongs to uid %d, not to you or root, and lies under %s, which belongs to uid %d"
                           folder owner above (file-attribute-user-id up)))))))
          (if done
              why
            (presenced--untrusted
             "its folder %s belongs to uid %d, and so does every folder above it"
             folder owner))))))))

(defun presenced--check-folder (path)
  "The check docs/protocol.md §1 asks before connecting to PATH.
Returns (ok FOLDER . ATTRIBUTES), (missing . WHY) when the folder
does not exist (nothing is connected to then: a daemon is started
instead), or (untrusted . WHY)."
  (let* ((folder (presenced--folder-of path))
         (attributes (file-attributes folder 'integer))
         (type (and attributes (file-attribute-type attributes))))
    (cond
     ((null attributes)
      (cons 'missing (format "no socket there (its folder %s does not exist)" folder)))
     ((stringp type)
      (cons 'untrusted
            (presenced--untrusted
             "its folder %s is a symbolic link, which leads wherever its maker chose"
             folder)))
     ((not (eq type t))
      (cons 'untrusted (format "its folder %s is not a folder" folder)))
     (t
      (let ((why (presenced--distrust folder attributes)))
        (if why
            (cons 'untrusted why)
          (cons 'ok (cons folder attributes))))))))

(defun presenced--same-folder (a b)
  "Whether attributes A and B are of one folder with one owner and mode."
  (and a b
       (equal (file-attribute-device-number a) (file-attribute-device-number b))
       (equal (file-attribute-inode-number a) (file-attribute-inode-number b))
       (eql (file-attribute-user-id a) (file-attribute-user-id b))
       (equal (file-attribute-modes a) (file-attribute-modes b))))

;;;; The connection

(defun presenced--open (path)
  "Connect to the daemon at PATH, checked first.
Returns the process, or (KIND . WHY) with KIND `missing' or
`refused' (nobody serves the socket: a new daemon would help) or
`failed'."
  (let ((checked (presenced--check-folder path)))
    (pcase checked
      (`(missing . ,why) (cons 'missing why))
      (`(untrusted . ,why) (cons 'failed why))
      (`(ok ,folder . ,attributes)
       (if (> (string-bytes path) 107)
           (cons 'failed (format "%s is too long for a socket address" path))
         (condition-case err
             (let ((process (make-network-process
                             :name "presenced"
                             :family 'local
                             :service path
                             :coding 'binary
                             :noquery t
                             :filter #'presenced--filter
                             :sentinel #'presenced--sentinel)))
               ;; Before a byte is sent: does the path still lead to the
               ;; folder checked, with the same owner and mode?  If not,
               ;; whoever changed it may be the one listening.
               (if (presenced--same-folder (file-attributes folder 'integer)
                                           attributes)
                   (progn
                     (setq presenced--checked-folder (cons folder attributes))
                     process)
                 (delete-process process)
                 (cons 'failed
                       (presenced--untrusted
                        "its folder %s changed between the check and the connection"
                        folder))))
           (file-error
            (let ((why (mapconcat (lambda (part) (format "%s" part))
                                  (cl-remove-if-not #'stringp (cdr err)) ": ")))
              (cond ((not (file-exists-p path))
                     (cons 'missing "no socket there (ENOENT)"))
                    ((string-match-p "refused" why)
                     (cons 'refused "nothing listens on it (ECONNREFUSED)"))
                    (t (cons 'failed why)))))))))))

(defun presenced--reset-connection (process)
  "Start the per-connection state for PROCESS."
  (setq presenced--process process
        presenced--pending (make-hash-table :test #'eql)
        presenced--next-id 0
        presenced--partial ""
        presenced--answered nil
        presenced--shutdown-reason nil
        presenced--refusal nil))

(defun presenced--guarded (function &rest args)
  "Call FUNCTION with ARGS, reporting an error instead of losing it.
A bug in one handler must not stop the lines after it."
  (condition-case err
      (apply function args)
    (error (message "presenced: internal error: %s" (error-message-string err)))))

(defun presenced--filter (process bytes)
  "Take BYTES from PROCESS: split lines and route each."
  (when (eq process presenced--process)
    (setq presenced--partial (concat presenced--partial bytes))
    (save-match-data
      (let (newline)
        (while (and (eq process presenced--process)
                    (setq newline (string-match "\n" presenced--partial)))
          (let ((line (substring presenced--partial 0 newline)))
            (setq presenced--partial (substring presenced--partial (1+ newline)))
            (unless (string-match-p "\\`[ \t\r]*\\'" line)
              (presenced--dispatch
               process (decode-coding-string line 'utf-8)))))))))

(defun presenced--dispatch (process line)
  "Route LINE from PROCESS: an event, or the reply to a request."
  (let ((message (condition-case nil
                     (json-parse-string line :object-type 'hash-table
                                        :null-object nil :false-object :false)
                   (error nil))))
    (cond
     ((not (hash-table-p message))
      (message "presenced: the daemon sent a line that is not JSON: %s" line))
     ((gethash "event" message)
      (when (equal (gethash "event" message) "shutdown")
        (setq presenced--shutdown-reason
              (or (presenced--get message "payload" "reason") "shutdown")))
      (presenced--guarded #'presenced--on-event process message))
     ((null (gethash "id" message))
      ;; A refusal of the connection or of a line the daemon could not read.
      (let ((failure (gethash "error" message)))
        (when (hash-table-p failure)
          (setq presenced--refusal (format "%s" (or (gethash "message" failure)
                                                    (gethash "code" failure)))))))
     (t
      (let* ((id (gethash "id" message))
             (callback (gethash id presenced--pending)))
        (when callback
          (remhash id presenced--pending)
          (setq presenced--answered t)
          (when (functionp callback)
            (presenced--guarded callback message))))))))

(defun presenced--disconnected-reply (reason)
  "The reply a request gets when the connection closes first, for REASON."
  (let ((reply (make-hash-table :test #'equal))
        (error (make-hash-table :test #'equal)))
    (puthash "code" "disconnected" error)
    (puthash "message" reason error)
    (puthash "ok" :false reply)
    (puthash "error" error reply)
    reply))

(defun presenced--fail-pending (reason)
  "Give every request still waiting a `disconnected' reply, for REASON."
  (let ((pending presenced--pending))
    (setq presenced--pending (make-hash-table :test #'eql))
    (maphash (lambda (_id callback)
               (when (functionp callback)
                 (presenced--guarded callback (presenced--disconnected-reply reason))))
             pending)))

(defun presenced--ok (reply)
  "Whether REPLY is a success."
  (eq (gethash "ok" reply) t))

(defun presenced--error-code (reply)
  "The error code of REPLY."
  (presenced--get reply "error" "code"))

(defun presenced--request (message &optional callback)
  "Send MESSAGE, an alist without id; CALLBACK gets the reply.
CALLBACK is called with a `disconnected' error reply if the
connection closes first, or at once if there is none."
  (let ((process presenced--process))
    (if (not (and process (process-live-p process)))
        (when callback
          (funcall callback (presenced--disconnected-reply "not connected")))
      (let ((id (cl-incf presenced--next-id)))
        (puthash id (or callback t) presenced--pending)
        (condition-case err
            (process-send-string
             process
             (concat (encode-coding-string
                      (json-serialize (cons (cons 'id id) message)) 'utf-8)
                     "\n"))
          (error
           (presenced--lost process (format "writing to the daemon failed: %s"
                                            (error-message-string err)))))))))

(defun presenced--sentinel (process _event)
  "PROCESS changed state: when it is closed, the connection is lost."
  (when (and (eq process presenced--process)
             (memq (process-status process) '(closed failed exit signal)))
    (presenced--lost process "the daemon closed the connection")))

(defun presenced--close ()
  "Close the connection from this side; waiting requests get `disconnected'."
  (let ((process presenced--process))
    (setq presenced--process nil)
    (when process
      (delete-process process))
    (presenced--fail-pending "the connection was closed")))

;;;; Entries and buffers

(defun presenced--standing-of (fields)
  "The standing fields of FIELDS: a track reply, role payload or resume role."
  (let ((standing (make-hash-table :test #'equal)))
    ;; `suspended': the owner of a topic shared across hosts, held back
    ;; while its daemon cannot reach etcd; its role is "spectator".
    (dolist (name '("role" "readonly" "position" "owner" "suspended"))
      (puthash name (gethash name fields) standing))
    standing))

(defun presenced--role (entry)
  "ENTRY's role, a string, when it is joined."
  (and (eq (presenced--entry-status entry) 'joined)
       (presenced--get (presenced--entry-standing entry) "role")))

(defun presenced--suspended-p (entry)
  "Whether ENTRY is the owner held back while its daemon cannot reach etcd.
Its role is then \"spectator\", so its buffer is read-only."
  (and (eq (presenced--entry-status entry) 'joined)
       (eq (presenced--get (presenced--entry-standing entry) "suspended") t)))

(defconst presenced--suspended
  "suspended: the shared topic's etcd cannot be reached"
  "What a suspended owner is told.")

(defun presenced--guarded-p (entry state)
  "Whether writes of the buffer of STATE, on ENTRY, to its file are refused.
While the buffer is a spectator, its entry was removed, or the
package keeps it read-only (`presenced-on-unreachable')."
  (or (eq (presenced--entry-status entry) 'removed)
      (equal (presenced--role entry) "spectator")
      (and (presenced--buffer-restricted state) t)))

(defun presenced--owner (entry)
  "The owner to name for ENTRY, or nil when none is known.
Joined: from its standing, else the subscription's; removed: the
subscription's; otherwise (the daemon away, say) none.  A suspended
entry names none: the owner is this editor, and nobody else holds
the file."
  (pcase (presenced--entry-status entry)
    ((guard (presenced--suspended-p entry)) nil)
    ('joined
     (let ((owner (presenced--get (presenced--entry-standing entry) "owner")))
       (if (hash-table-p owner) owner (presenced--entry-topic-owner entry))))
    ('removed (presenced--entry-topic-owner entry))))

(defun presenced--restrict (buffer)
  "Make BUFFER read-only, remembering its own setting the first time."
  (let ((state (gethash buffer presenced--buffers)))
    (with-current-buffer buffer
      (unless (presenced--buffer-restricted state)
        (setf (presenced--buffer-restricted state) t
              (presenced--buffer-saved-read-only state) buffer-read-only))
      ;; Every time: reading the file again resets `buffer-read-only'.
      (unless buffer-read-only
        (read-only-mode 1)))))

(defun presenced--unrestrict (buffer)
  "Give BUFFER its own read-only setting back; non-nil if it was restricted."
  (let ((state (gethash buffer presenced--buffers)))
    (when (and state (presenced--buffer-restricted state))
      (setf (presenced--buffer-restricted state) nil)
      (when (buffer-live-p buffer)
        (with-current-buffer buffer
          (let ((read-only (presenced--buffer-saved-read-only state)))
            (unless (eq (and read-only t) (and buffer-read-only t))
              (read-only-mode (if read-only 1 -1))))))
      t)))

(defun presenced--tell (buffer visibly format-string &rest args)
  "Say FORMAT-STRING with ARGS about BUFFER, unless it was said last.
VISIBLY says it again after the current command's own messages."
  (let ((state (gethash buffer presenced--buffers))
        (text (apply #'format format-string args)))
    (unless (equal (presenced--buffer-last-message state) text)
      (setf (presenced--buffer-last-message state) text)
      (if visibly
          (presenced--say-visibly "%s" text)
        (presenced--say "%s" text)))))

(defun presenced--record-read (buffer)
  "Note that BUFFER has just read or written its file."
  (let ((state (gethash buffer presenced--buffers)))
    (when state
      (with-current-buffer buffer
        (setf (presenced--buffer-read-size state) (presenced--file-size buffer-file-name)
              (presenced--buffer-read-modtime state) (visited-file-modtime)
              (presenced--buffer-read-tick state) (buffer-chars-modified-tick))))))

(defun presenced--own-changes-p (buffer)
  "Whether BUFFER was changed since it read or wrote its file."
  (let ((state (gethash buffer presenced--buffers)))
    (with-current-buffer buffer
      (and (buffer-modified-p)
           (not (eql (buffer-chars-modified-tick)
                     (presenced--buffer-read-tick state)))))))

(defun presenced--disk-changed-p (buffer)
  "Whether BUFFER's file changed on disk since the buffer read it."
  (let ((state (gethash buffer presenced--buffers)))
    (with-current-buffer buffer
      (and buffer-file-name
           (file-exists-p buffer-file-name)
           (or (not (verify-visited-file-modtime buffer))
               (not (eql (presenced--file-size buffer-file-name)
                         (presenced--buffer-read-size state))))))))

(defun presenced--reload (buffer)
  "Read BUFFER's file again, keeping point and each window's view.
Only when the file changed on disk and the buffer has no changes of
its own.  Returns `reloaded', `kept' (changes of its own) or nil."
  (cond
   ((not (presenced--disk-changed-p buffer)) nil)
   ((presenced--own-changes-p buffer) 'kept)
   (t
    (with-current-buffer buffer
      (let ((point (point))
            (views (mapcar (lambda (window)
                             (list window (window-point window) (window-start window)))
                           (get-buffer-window-list buffer nil t))))
        (revert-buffer t t t)
        (goto-char (min point (point-max)))
        (pcase-dolist (`(,window ,window-point ,start) views)
          (when (window-live-p window)
            (set-window-start window (min start (point-max)) t)
            (set-window-point window (min window-point (point-max)))))
        (presenced--record-read buffer)))
    'reloaded)))

(defun presenced--saved-by (entry)
  "`KEY saved it at HH:MM' from the last save ENTRY heard of, or nil."
  (let ((save (presenced--entry-last-save entry)))
    (and save (format "%s saved it at %s" (car save) (presenced--clock (cdr save))))))

(defun presenced--promoted (buffer entry)
  "BUFFER of ENTRY became the owner: make it editable, reading it again first."
  (let ((name (presenced--display-name buffer))
        (outcome (presenced--reload buffer)))
    (presenced--unrestrict buffer)
    (pcase outcome
      ('reloaded
       (presenced--tell buffer nil "you own %s now; reloaded: %s" name
                        (or (presenced--saved-by entry) "it changed on disk")))
      ('kept
       (presenced--tell buffer t "you own %s now; editable again, but the file changed on disk and this buffer has changes of its own, so it was not read again"
                        name))
      (_ (presenced--tell buffer nil "you own %s now; editable again" name)))))

(defun presenced--apply (buffer)
  "Put BUFFER in the state its entry asks, and say why when it is new."
  (let* ((state (gethash buffer presenced--buffers))
         (entry (and state (gethash (presenced--buffer-topic state) presenced--entries)))
         (name (and state (presenced--display-name buffer))))
    (when (and entry (buffer-live-p buffer))
      (pcase (presenced--entry-status entry)
        ('joined
         (if (equal (presenced--role entry) "owner")
             (if (presenced--buffer-restricted state)
                 (presenced--promoted buffer entry)
               (setf (presenced--buffer-last-message state) nil))
           (let ((modified (presenced--own-changes-p buffer)))
             (presenced--restrict buffer)
             (if (presenced--suspended-p entry)
                 (presenced--tell buffer t "%s: %s; read-only until it returns%s" name
                                  presenced--suspended
                                  (if modified " (your unsaved changes are kept)" ""))
               (presenced--tell buffer t "%s: %s is editing; read-only%s" name
                                (presenced--who (presenced--owner entry))
                                (if modified " (your unsaved changes are kept)" ""))))))
        ('unreachable
         (let ((reason (format "cannot reach the daemon at %s (%s)"
                               (presenced-socket-path)
                               (or presenced--link-error "no answer"))))
           (if (eq presenced-on-unreachable 'read-only)
               (progn
                 (presenced--restrict buffer)
                 (presenced--tell buffer t "%s: %s; read-only until it answers" name reason))
             (presenced--unrestrict buffer)
             (presenced--tell buffer t "%s: %s; editable, but nobody else will know you are editing it"
                              name reason))))
        ('refused
         (presenced--unrestrict buffer)
         (presenced--tell buffer t "%s: the daemon refused to track it (%s); editable"
                          name (presenced--entry-error entry)))
        ('removed
         (let ((by (presenced--get (presenced--entry-removed-by entry) "by")))
           (presenced--restrict buffer)
           (presenced--tell buffer t "%s: removed by %s (uid %s, pid %s); read-only. M-x presenced-join to queue again"
                            name (presenced--get by "user") (presenced--get by "uid")
                            (presenced--get by "pid"))))))))

(defun presenced--apply-entry (entry)
  "Apply ENTRY's state to its buffers and update the mode lines."
  (dolist (buffer (presenced--entry-buffers entry))
    (presenced--apply buffer))
  (force-mode-line-update t))

(defun presenced--set-standing (entry standing)
  "ENTRY is joined with STANDING."
  (setq presenced--slow nil)
  (setf (presenced--entry-status entry) 'joined
        (presenced--entry-standing entry) standing)
  (presenced--apply-entry entry))

(defun presenced--set-ref (entry ref)
  "ENTRY is known by REF from now on."
  (let ((old (presenced--entry-ref entry)))
    (when (and old (eq (gethash old presenced--by-ref) entry))
      (remhash old presenced--by-ref)))
  (setf (presenced--entry-ref entry) ref)
  (when ref
    (puthash ref entry presenced--by-ref)))

;;;; The subscription

(defun presenced--same-entry-p (a b)
  "Whether A and B, metas or the owner the daemon names, are one entry.
Not by ref: an update (every save sends one) gives the entry a new
ref, and no role event tells a spectator its owner's new one.  The
key, the process and the time it joined are what an update keeps."
  (and (hash-table-p a) (hash-table-p b)
       (gethash "key" a)
       (seq-every-p (lambda (field) (equal (gethash field a) (gethash field b)))
                    '("key" "pid" "joined_at"))))

(defun presenced--note-topic-owner (entry owner)
  "Take OWNER, from a subscription event, as the owner of ENTRY's topic.
When it is the owner ENTRY's standing names, the standing takes its
latest ref: the owner's saves change it, and no role event says so."
  (setf (presenced--entry-topic-owner entry) owner)
  (let ((standing (presenced--entry-standing entry)))
    (when (and (hash-table-p standing)
               (presenced--same-entry-p (gethash "owner" standing) owner))
      (puthash "owner" owner standing))))

(defun presenced--add-metas (metas presences)
  "Add the metas of PRESENCES, {key: {metas: [...]}}, to METAS by ref."
  (when (hash-table-p presences)
    (maphash (lambda (key presence)
               (seq-doseq (meta (or (presenced--get presence "metas") []))
                 (puthash "key" key meta)
                 (puthash (gethash "phx_ref" meta) meta metas)))
             presences)))

(defun presenced--own-meta-p (entry meta)
  "Whether META, from the subscription of ENTRY's topic, is ENTRY's own.
The diff of our own `update' may come before its reply gives the
new ref, so a meta replacing our current ref is ours too."
  (let ((ref (presenced--entry-ref entry)))
    (and ref
         (or (equal (gethash "phx_ref" meta) ref)
             (equal (gethash "phx_ref_prev" meta) ref)))))

(defun presenced--note-saves (entry)
  "Remember the latest save by another entry on ENTRY's topic, if newer.
The owner's saves, and a spectator's `presenced-write-anyway': whoever
wrote the file last is who a reload at promotion names."
  (let ((latest (presenced--entry-last-save entry)))
    (maphash (lambda (_ref meta)
               (let ((saved-at (gethash "saved_at" meta)))
                 (when (and (numberp saved-at)
                            (not (presenced--own-meta-p entry meta))
                            (or (null latest) (> saved-at (cdr latest))))
                   (setq latest (cons (gethash "key" meta) saved-at)))))
             (presenced--entry-metas entry))
    (setf (presenced--entry-last-save entry) latest)))

(defun presenced--saves-by-others (entry payload reasons)
  "(KEY . SAVED-AT) of each other entry whose `saved_at' a diff changed.
PAYLOAD and REASONS are the diff's; ENTRY's metas are those before
it.  Any entry, not only the owner: a spectator that wrote anyway
changed the file as much as an owner's save."
  (let (saves)
    (maphash
     (lambda (key presence)
       (seq-doseq (meta (or (presenced--get presence "metas") []))
         (let* ((previous-ref (gethash "phx_ref_prev" meta))
                (previous (and previous-ref
                               (gethash previous-ref (presenced--entry-metas entry))))
                (saved-at (gethash "saved_at" meta)))
           (when (and previous
                      (equal (presenced--get reasons previous-ref) "update")
                      (not (presenced--own-meta-p entry meta))
                      (numberp saved-at)
                      (not (equal saved-at (gethash "saved_at" previous))))
             (push (cons key saved-at) saves)))))
     (or (presenced--get payload "joins") (make-hash-table)))
    (nreverse saves)))

(defun presenced--follow-save (entry key saved-at)
  "Read ENTRY's file again in a spectator: KEY wrote it at SAVED-AT.
The owner does not: it is the one editing, and Emacs itself warns
at its next save that the file changed since it was read."
  (when (equal (presenced--role entry) "spectator")
    (dolist (buffer (presenced--entry-buffers entry))
      (when (and (buffer-live-p buffer)
                 (eq (presenced--reload buffer) 'reloaded))
        (presenced--restrict buffer)
        (presenced--tell buffer nil "%s: reloaded: %s saved it at %s"
                         (presenced--display-name buffer) key
                         (presenced--clock saved-at))))))

(defun presenced--on-presence (message)
  "Apply a `presence_state' or `presence_diff' MESSAGE to its entry."
  (let ((entry (gethash (gethash "topic" message) presenced--entries))
        (payload (gethash "payload" message)))
    (when entry
      (if (equal (gethash "event" message) "presence_state")
          (progn
            ;; A state replaces the whole view, even one not asked for.
            (setf (presenced--entry-metas entry) (make-hash-table :test #'equal))
            (presenced--add-metas (presenced--entry-metas entry) payload)
            (presenced--note-topic-owner entry (gethash "owner" message))
            (presenced--note-saves entry))
        (presenced--note-topic-owner entry (gethash "owner" message))
        (let ((saves (presenced--saves-by-others entry payload (gethash "reasons" message)))
              (metas (presenced--entry-metas entry)))
          (when (hash-table-p (presenced--get payload "leaves"))
            (maphash (lambda (_key presence)
                       (seq-doseq (meta (or (presenced--get presence "metas") []))
                         (remhash (gethash "phx_ref" meta) metas)))
                     (presenced--get payload "leaves")))
          (presenced--add-metas metas (presenced--get payload "joins"))
          (presenced--note-saves entry)
          (pcase-dolist (`(,key . ,saved-at) saves)
            (presenced--follow-save entry key saved-at))))
      (force-mode-line-update t))))

;;;; Talking to the daemon

(defun presenced--track (entry)
  "Send the `track' of ENTRY on the connection."
  (let ((process presenced--process))
    (setf (presenced--entry-tracking entry) t)
    (presenced--request
     `((op . "track")
       (topic . ,(presenced--entry-topic entry))
       (key . ,(presenced--entry-key entry))
       (meta . ,(presenced--entry-meta entry))
       ;; The entry dies with the connection, so a killed editor's
       ;; spectators are promoted at once.
       (lifetime . "connection")
       (subscribe . t))
     (lambda (reply)
       (setf (presenced--entry-tracking entry) nil)
       (cond
        ((and (presenced--ok reply) (presenced--entry-left entry))
         ;; The buffer went while the track was on its way.
         (when (eq process presenced--process)
           (presenced--request `((op . "untrack")
                                 (topic . ,(presenced--entry-topic entry))
                                 (ref . ,(gethash "ref" reply))))
           (unless (gethash (presenced--entry-topic entry) presenced--entries)
             (presenced--request `((op . "unsubscribe")
                                   (topic . ,(presenced--entry-topic entry)))))))
        ((or (presenced--entry-left entry) (not (eq process presenced--process))))
        ((presenced--ok reply)
         (presenced--set-ref entry (gethash "ref" reply))
         (setf (presenced--entry-token entry) (gethash "resume_token" reply)
               (presenced--entry-removed-by entry) nil
               (presenced--entry-meta-dirty entry) nil)
         (presenced--set-standing entry (presenced--standing-of reply)))
        ((not (equal (presenced--error-code reply) "disconnected"))
         ;; A disconnect is retried by the reconnect; anything else is final.
         (setf (presenced--entry-status entry) 'refused
               (presenced--entry-error entry)
               (or (presenced--get reply "error" "message") "refused"))
         (setq presenced--slow nil)
         (presenced--apply-entry entry)))))))

(defun presenced--join (entry)
  "Put ENTRY in the topic's queue, connecting first if need be."
  (setf (presenced--entry-status entry) 'joining)
  (pcase presenced--link-state
    ('up (presenced--track entry))
    ('idle (presenced--connect))))

(defun presenced--leave (entry)
  "Take ENTRY out of its topic."
  (setf (presenced--entry-left entry) t)
  (let ((ref (presenced--entry-ref entry))
        (topic (presenced--entry-topic entry)))
    (when ref
      (remhash ref presenced--by-ref))
    (cond
     ((and (eq presenced--link-state 'up) ref)
      (presenced--request `((op . "untrack") (topic . ,topic) (ref . ,ref)))
      (unless (gethash topic presenced--entries)
        (presenced--request `((op . "unsubscribe") (topic . ,topic)))))
     ((presenced--entry-token entry)
      (push (list (presenced--entry-token entry) ref topic) presenced--orphans)))))

(defun presenced--set-meta-fields (entry fields &optional callback)
  "Set FIELDS, an alist of names and values, in ENTRY's meta, and send it.
CALLBACK gets the reply, as `presenced--send-meta' says."
  (let ((meta (copy-hash-table (presenced--entry-meta entry))))
    (pcase-dolist (`(,name . ,value) fields)
      (puthash name value meta)
      (puthash name value (presenced--entry-unconfirmed entry)))
    (setf (presenced--entry-meta entry) meta)
    (presenced--send-meta entry callback)))

(defun presenced--send-meta (entry &optional callback)
  "Send ENTRY's meta as an `update'; CALLBACK gets the reply.
One update at a time: the reply's new ref names the entry for the next.
CALLBACK gets nil at once when nothing could be sent now."
  (setf (presenced--entry-meta-dirty entry) t)
  (cond
   ((presenced--entry-updating entry)
    (setf (presenced--entry-update-again entry) t)
    (when callback (funcall callback nil)))
   ((not (and (eq presenced--link-state 'up) (presenced--entry-ref entry)))
    ;; Sent once the entry is back (after a resume), or with its next track.
    (when callback (funcall callback nil)))
   (t
    (let ((process presenced--process)
          (sent-ref (presenced--entry-ref entry))
          (carried (copy-hash-table (presenced--entry-unconfirmed entry))))
      (setf (presenced--entry-updating entry) t
            (presenced--entry-meta-dirty entry) nil)
      (presenced--request
       `((op . "update")
         (topic . ,(presenced--entry-topic entry))
         (ref . ,sent-ref)
         (meta . ,(presenced--entry-meta entry)))
       (lambda (reply)
         (setf (presenced--entry-updating entry) nil)
         (cond
          ((presenced--ok reply)
           (let ((unconfirmed (presenced--entry-unconfirmed entry)))
             (maphash (lambda (name value)
                        (when (eql (gethash name unconfirmed) value)
                          (remhash name unconfirmed)))
                      carried))
           (if (not (presenced--entry-left entry))
               (presenced--set-ref entry (gethash "ref" reply))
             ;; The buffer went while this was on its way: the untrack
             ;; sent then named the ref this update replaced.
             (when (eq process presenced--process)
               (presenced--request `((op . "untrack")
                                     (topic . ,(presenced--entry-topic entry))
                                     (ref . ,(gethash "ref" reply)))))))
          ((equal (presenced--error-code reply) "disconnected")
           (setf (presenced--entry-meta-dirty entry) t))
          ((and (presenced--entry-ref entry)
                (not (equal (presenced--entry-ref entry) sent-ref)))
           ;; An `updated' event (root's update) gave the entry a new ref
           ;; first, so ours named a ref that was gone: send it again,
           ;; on the meta that event brought.
           (setf (presenced--entry-update-again entry) t))
          (t (setf (presenced--entry-meta-dirty entry) t)))
         (when (and (presenced--entry-update-again entry)
                    (not (presenced--entry-left entry))
                    (eq process presenced--process))
           (setf (presenced--entry-update-again entry) nil)
           (presenced--send-meta entry))
         (when callback (funcall callback reply))))))))

(defun presenced--start-daemon (path callback)
  "Start a daemon for PATH through the CLI; CALLBACK gets nil or why not.
`presence list' starts one and waits until it serves the socket."
  (let ((output (generate-new-buffer " *presenced-start*")))
    (condition-case err
        (make-process
         :name "presenced-start"
         :buffer output
         ;; One argument, so that a path starting with `-' is no flag.
         :command (list presenced-program (concat "--socket=" path) "list" "--json")
         :connection-type 'pipe
         :noquery t
         :stderr output
         :sentinel
         (lambda (process _event)
           (unless (process-live-p process)
             (let ((said (with-current-buffer output
                           (string-trim (replace-regexp-in-string
                                         "\n+" " " (buffer-string))))))
               (kill-buffer output)
               (funcall callback
                        (unless (and (eq (process-status process) 'exit)
                                     (zerop (process-exit-status process)))
                          (format "could not start a daemon: `%s list' exited with status %d%s"
                                  presenced-program (process-exit-status process)
                                  (if (string-empty-p said) "" (concat ": " said)))))))))
      (error
       (kill-buffer output)
       (funcall callback (format "could not start a daemon: cannot run `%s': %s"
                                 presenced-program (error-message-string err)))))))

(defun presenced--stop-retrying ()
  "Cancel the pending connection attempt."
  (when presenced--retry-timer
    (cancel-timer presenced--retry-timer)
    (setq presenced--retry-timer nil)))

(defun presenced--unreachable (reason)
  "The daemon cannot be reached, for REASON.
Every entry falls back to `presenced-on-unreachable'.  A later
buffer, or \\[presenced-reconnect], tries again."
  (presenced--stop-retrying)
  (setq presenced--outage nil
        presenced--slow nil
        presenced--link-state 'idle
        presenced--process nil
        presenced--link-error reason
        presenced--reconnecting nil)
  (maphash (lambda (_topic entry)
             (setf (presenced--entry-tracking entry) nil)
             (unless (eq (presenced--entry-status entry) 'removed)
               (setf (presenced--entry-status entry) 'unreachable))
             (presenced--apply-entry entry))
           presenced--entries))

(defun presenced--track-unjoined (process)
  "Track on PROCESS every entry that has no place yet."
  (maphash (lambda (_topic entry)
             (when (and (eq process presenced--process)
                        (not (presenced--entry-ref entry))
                        (not (presenced--entry-tracking entry))
                        (not (eq (presenced--entry-status entry) 'removed)))
               (setf (presenced--entry-status entry) 'joining)
               (presenced--track entry)))
           presenced--entries))

(defun presenced--removed (entry payload)
  "Forget ENTRY: a `removed' event with PAYLOAD took it away."
  (when (presenced--entry-ref entry)
    (remhash (presenced--entry-ref entry) presenced--by-ref))
  (setf (presenced--entry-ref entry) nil
        (presenced--entry-token entry) nil
        (presenced--entry-status entry) 'removed
        (presenced--entry-removed-by entry) payload)
  (presenced--apply-entry entry))

(defun presenced--restore (process)
  "Get everything back on PROCESS after a (re)connect.
As docs/protocol.md §13 says: resume every token, take the standings
it gives, track again what the daemon no longer has, subscribe again."
  (let ((tokens nil)
        (owner-of-token (make-hash-table :test #'equal))
        (leaving presenced--orphans))
    (maphash (lambda (_topic entry)
               (when (presenced--entry-token entry)
                 (push (presenced--entry-token entry) tokens)
                 (puthash (presenced--entry-token entry) entry owner-of-token)))
             presenced--entries)
    (setq presenced--orphans nil)
    (dolist (orphan leaving)
      (push (car orphan) tokens))
    (if (null tokens)
        (presenced--track-unjoined process)
      (presenced--request
       `((op . "resume") (tokens . ,(vconcat tokens)))
       (lambda (reply)
         (when (eq process presenced--process)
           (if (equal (presenced--error-code reply) "disconnected")
               ;; The next connection resumes with the same tokens.
               (setq presenced--orphans (append leaving presenced--orphans))
             (presenced--resumed process reply tokens owner-of-token leaving))))))))

(defun presenced--resumed (process reply tokens owner-of-token leaving)
  "Act on REPLY, the answer on PROCESS to a `resume' of TOKENS.
OWNER-OF-TOKEN maps a token to its entry; LEAVING are the orphans."
  (let ((ok (presenced--ok reply))
        (gone nil))
    ;; The refs first: an entry may have been updated while away.
    (when ok
      (maphash (lambda (token ref)
                 (let ((entry (gethash token owner-of-token)))
                   (when (and entry (eq (gethash (presenced--entry-topic entry)
                                                 presenced--entries)
                                        entry))
                     (presenced--set-ref entry ref))))
               (or (presenced--get reply "refs") (make-hash-table))))
    (when ok
      (maphash (lambda (ref standing)
                 (let ((entry (gethash ref presenced--by-ref)))
                   (when entry
                     (presenced--set-standing entry (presenced--standing-of standing))
                     (presenced--request `((op . "subscribe")
                                           (topic . ,(presenced--entry-topic entry))))
                     (when (presenced--entry-meta-dirty entry)
                       (presenced--send-meta entry)))))
               (or (presenced--get reply "roles") (make-hash-table))))
    ;; An orphan's ref may have changed while it was away (an update
    ;; whose reply was lost, or one by root): `refs' names it now.
    (dolist (orphan leaving)
      (let ((ref (or (presenced--get reply "refs" (car orphan)) (nth 1 orphan))))
        (when (and ok ref (seq-contains-p (or (gethash "resumed" reply) []) ref))
          (presenced--request `((op . "untrack") (topic . ,(nth 2 orphan))
                                (ref . ,ref))))))
    (when ok
      (maphash (lambda (token payload)
                 (let ((entry (gethash token owner-of-token)))
                   (when (and entry (eq (gethash (presenced--entry-topic entry)
                                                 presenced--entries)
                                        entry))
                     (presenced--removed entry payload))))
               (or (presenced--get reply "removed") (make-hash-table))))
    ;; Entries the daemon no longer has, or would not give back, lost
    ;; their place: they join at the end again.
    (if ok
        (progn
          (setq gone (append (gethash "expired" reply) nil))
          (maphash (lambda (token _error) (push token gone))
                   (or (presenced--get reply "refused") (make-hash-table))))
      (setq gone tokens))
    (dolist (token gone)
      (let ((entry (gethash token owner-of-token)))
        (when (and entry (eq (gethash (presenced--entry-topic entry) presenced--entries)
                             entry))
          (when (presenced--entry-ref entry)
            (remhash (presenced--entry-ref entry) presenced--by-ref))
          (setf (presenced--entry-ref entry) nil
                (presenced--entry-token entry) nil))))
    (presenced--track-unjoined process)))

(defun presenced--connected (process)
  "PROCESS is a new connection to the daemon."
  (presenced--stop-retrying)
  (presenced--reset-connection process)
  (setq presenced--link-state 'up
        presenced--link-error nil
        presenced--reconnecting nil)
  ;; Whatever the restore sends (perhaps nothing), this gets an answer
  ;; from a daemon that really serves us, which ends the outage.
  (presenced--request '((op . "ping")))
  (presenced--restore process))

(defun presenced--try-connecting (&rest options)
  "Open a connection, as OPTIONS (a plist) say.
:autostart starts a daemon once if none answers; :deadline (a
`float-time') keeps trying with growing pauses until then, else
once; :outage carries the pause and whether a daemon was started
over from the tries before; :delay waits a pause first; :reason
says why the connection closed."
  (let* ((generation presenced--generation)
         (path (presenced-socket-path))
         (outage (or (plist-get options :outage)
                     (list :pause 0.05 :started-daemon nil)))
         (deadline (plist-get options :deadline))
         attempt wait-and-retry)
    (setq wait-and-retry
          (lambda ()
            (let ((pause (plist-get outage :pause)))
              (setq presenced--retry-timer
                    (run-at-time (max 0 (min pause (- deadline (float-time)))) nil
                                 (lambda ()
                                   (setq presenced--retry-timer nil)
                                   (funcall attempt))))
              (plist-put outage :pause (min (* 2 pause) 1.0)))))
    (setq attempt
          (lambda ()
            (when (and (= generation presenced--generation)
                       (not (eq presenced--link-state 'up)))
              (let ((opened (presenced--open path)))
                (cond
                 ((processp opened)
                  (presenced--connected opened))
                 ((and (plist-get options :autostart)
                       presenced-autostart
                       (not (plist-get outage :started-daemon))
                       (memq (car opened) '(missing refused)))
                  (plist-put outage :started-daemon t)
                  (presenced--start-daemon
                   path
                   (lambda (failure)
                     (when (= generation presenced--generation)
                       (cond
                        ((and failure (not deadline))
                         (presenced--unreachable failure))
                        (failure
                         ;; Perhaps another editor is starting one: keep trying.
                         (setq presenced--link-error failure)
                         (funcall wait-and-retry))
                        (t (funcall attempt)))))))
                 ((and deadline (< (float-time) deadline))
                  (setq presenced--link-error (cdr opened))
                  (funcall wait-and-retry))
                 (t
                  (presenced--unreachable
                   (if (plist-get options :reason)
                       (format "%s, and it did not come back: %s"
                               (plist-get options :reason) (cdr opened))
                     (cdr opened)))))))))
    (if (plist-get options :delay)
        (funcall wait-and-retry)
      (funcall attempt))))

(defun presenced--connect ()
  "Connect, unless connected or trying."
  (when (eq presenced--link-state 'idle)
    (setq presenced--link-state 'connecting
          presenced--outage nil)
    (cl-incf presenced--generation)
    (presenced--try-connecting :autostart t)))

(defun presenced--on-event (process message)
  "Handle the event MESSAGE from PROCESS."
  (when (eq process presenced--process)
    (let ((event (gethash "event" message))
          (payload (gethash "payload" message)))
      (pcase event
        ("role"
         (let ((entry (gethash (presenced--get payload "ref") presenced--by-ref)))
           (when entry
             (presenced--set-standing entry (presenced--standing-of payload)))))
        ((or "presence_state" "presence_diff")
         (presenced--on-presence message))
        ("removed"
         (let ((entry (gethash (presenced--get payload "ref") presenced--by-ref)))
           (when entry
             (presenced--removed entry payload))))
        ("updated"
         (let ((entry (gethash (presenced--get payload "prev_ref") presenced--by-ref)))
           (when entry
             (presenced--set-ref entry (presenced--get payload "ref"))
             (let ((meta (presenced--get payload "meta")))
               (when (hash-table-p meta)
                 ;; Ours that no update carried yet stay: an update of
                 ;; ours on its way named the old ref, and is sent again.
                 (maphash (lambda (name value) (puthash name value meta))
                          (presenced--entry-unconfirmed entry))
                 (setf (presenced--entry-meta entry) meta))))))
        ;; `shutdown' is noted by the dispatch and acted on at the close.
        (_ nil)))))

(defun presenced--lost (process reason)
  "PROCESS, the connection, is gone, for REASON.
Every buffer stays as it is (the daemon keeps the places for a
grace period) and the package gets back within
`presenced-reconnect-timeout'."
  (when (eq process presenced--process)
    (let ((shutdown presenced--shutdown-reason)
          (answered presenced--answered)
          (refusal presenced--refusal))
      (setq presenced--process nil)
      (when (process-live-p process)
        (delete-process process))
      (presenced--fail-pending reason)
      (setq presenced--link-state 'connecting
            presenced--reconnecting t)
      (cl-incf presenced--generation)
      (maphash (lambda (_topic entry) (setf (presenced--entry-tracking entry) nil))
               presenced--entries)
      (let ((why (cond (refusal (format "the daemon refused the connection (%s)" refusal))
                       (shutdown (format "the daemon shut down (%s)" shutdown))
                       (t reason))))
        ;; A connection that never got an answer does not end the outage.
        (if (or answered (not presenced--outage))
            (setq presenced--outage
                  (list :deadline (+ (float-time) presenced-reconnect-timeout)
                        :pause 0.05 :started-daemon nil))
          (when (>= (float-time) (plist-get presenced--outage :deadline))
            (setq why nil)
            (presenced--unreachable
             (format "%s, and it did not come back" reason))))
        (when why
          (presenced--try-connecting
           ;; A daemon stopped on purpose is restarted by whoever stopped
           ;; it; one that crashed may be replaced (its lock keeps it to one).
           :autostart (null shutdown)
           :deadline (plist-get presenced--outage :deadline)
           :outage presenced--outage
           :delay (not answered)
           :reason why))))))

;;;; Buffers

(defun presenced--file-buffer-p (buffer)
  "Whether BUFFER visits a local file this package follows."
  (with-current-buffer buffer
    (and buffer-file-name
         (not (buffer-base-buffer))
         (not (file-remote-p buffer-file-name))
         (not (file-directory-p buffer-file-name)))))

(defun presenced--detach (buffer)
  "Stop following BUFFER; leave its topic if it was the last buffer there."
  (let ((state (gethash buffer presenced--buffers)))
    (when state
      (presenced--unrestrict buffer)
      (remhash buffer presenced--buffers)
      (let ((entry (gethash (presenced--buffer-topic state) presenced--entries)))
        (when entry
          (setf (presenced--entry-buffers entry)
                (delq buffer (presenced--entry-buffers entry)))
          (unless (presenced--entry-buffers entry)
            (remhash (presenced--buffer-topic state) presenced--entries)
            (presenced--leave entry)))))))

(defun presenced--meta (path)
  "The meta of an entry for PATH: what others see of it."
  (let ((meta (make-hash-table :test #'equal)))
    (puthash "editor" (presenced--editor-name) meta)
    (puthash "file" path meta)
    (puthash "login" (presenced--login) meta)
    meta))

(defun presenced--wait (predicate seconds)
  "Process the daemon's lines until PREDICATE is true or SECONDS pass.
Returns non-nil if PREDICATE held."
  (let ((deadline (+ (float-time) seconds)))
    (while (and (not (funcall predicate)) (< (float-time) deadline))
      (accept-process-output nil 0.01))
    (funcall predicate)))

(defun presenced--attach (buffer &optional wait renamed)
  "Follow BUFFER, which was visited, read again or renamed.
WAIT waits up to `presenced-join-wait' for its role.  RENAMED
means BUFFER was given a file name and did not read the file."
  (if (not (and (buffer-live-p buffer) (presenced--file-buffer-p buffer)))
      (presenced--detach buffer)
    (with-current-buffer buffer
      (let* ((path (presenced-resolve-file buffer-file-name))
             (topic (condition-case err
                        (funcall presenced-topic-function path)
                      (error
                       (presenced--say "the topic function failed for %s: %s"
                                       path (error-message-string err))
                       nil)))
             (topic (and (stringp topic) (not (string-empty-p topic)) topic))
             (state (gethash buffer presenced--buffers)))
        (cond
         ((and state renamed (equal (presenced--buffer-topic state) topic))
          ;; Given the name of the file it visits already (`write-file'
          ;; or `set-visited-file-name' of it): it still holds the file
          ;; as it last read it, so its changes of its own stay its own,
          ;; and the modification time `set-visited-file-name' cleared
          ;; is the one it read.
          (when (and (equal (visited-file-modtime) 0)
                     (consp (presenced--buffer-read-modtime state)))
            (set-visited-file-modtime (presenced--buffer-read-modtime state)))
          (presenced--apply buffer))
         ((and state (equal (presenced--buffer-topic state) topic))
          ;; Read again: reading resets `buffer-read-only'.
          (presenced--record-read buffer)
          (presenced--apply buffer))
         (t
          (presenced--detach buffer)
          (when topic
            (puthash buffer (presenced--make-buffer :topic topic :path path)
                     presenced--buffers)
            (presenced--record-read buffer)
            (let ((entry (gethash topic presenced--entries)))
              (if entry
                  (progn
                    (push buffer (presenced--entry-buffers entry))
                    (presenced--apply buffer))
                (setq entry (presenced--make-entry
                             :topic topic
                             :key (if (and presenced-key (not (string-empty-p presenced-key)))
                                      presenced-key
                                    (presenced--login))
                             :meta (presenced--meta path)
                             :buffers (list buffer)
                             :status 'joining))
                (puthash topic entry presenced--entries)
                (presenced--join entry)
                (when (and wait (> presenced-join-wait 0) (not presenced--slow))
                  (unless (presenced--wait
                           (lambda () (not (eq (presenced--entry-status entry) 'joining)))
                           presenced-join-wait)
                    (setq presenced--slow t))))))))))))

(defun presenced--on-find-file ()
  "Follow the buffer of a visited file."
  (presenced--attach (current-buffer) t))

(defun presenced--on-rename ()
  "Follow the buffer under its new file name, or stop following it."
  (presenced--attach (current-buffer) t t))

(defun presenced--on-revert ()
  "Restrict the buffer again after reading its file cleared read-only."
  (let ((state (gethash (current-buffer) presenced--buffers)))
    (when state
      (presenced--record-read (current-buffer))
      ;; Only the restriction: whoever reverted says what it means.
      (when (and (presenced--buffer-restricted state) (not buffer-read-only))
        (read-only-mode 1)))))

(defun presenced--on-kill-buffer ()
  "Leave the topic of a buffer being killed."
  (presenced--detach (current-buffer)))

;;;; Saving

(defun presenced--guard-message (buffer entry)
  "Why BUFFER of ENTRY may not be written to its file."
  (let* ((name (presenced--display-name buffer))
         (status (presenced--entry-status entry))
         (owner (and (eq status 'joined) (presenced--owner entry)))
         (what-to-do "M-x presenced-write-anyway to save anyway, or C-x C-w to write another file"))
    (cond
     ((presenced--suspended-p entry)
      (format "presenced: %s: %s, so your copy is read-only until it returns. %s"
              name presenced--suspended what-to-do))
     ((hash-table-p owner)
      (format "presenced: %s is being edited by %s (pid %s) since %s; your copy is read-only. %s"
              name (gethash "key" owner) (gethash "pid" owner)
              (presenced--clock (gethash "joined_at" owner)) what-to-do))
     ((eq status 'removed)
      (let ((by (presenced--get (presenced--entry-removed-by entry) "by")))
        (format "presenced: %s: removed by %s (uid %s, pid %s); your copy is read-only. M-x presenced-join to queue again, %s"
                name (presenced--get by "user") (presenced--get by "uid")
                (presenced--get by "pid") what-to-do)))
     (t
      ;; Kept read-only by `presenced-on-unreachable'.
      (format "presenced: %s: the daemon cannot say who is editing it, so your copy is read-only until it answers. %s"
              name what-to-do)))))

(defun presenced--refuse-write (&optional file)
  "Signal a `user-error' if the current buffer may not write FILE.
FILE is the buffer's own file unless given.  Only writing to its
own file is refused, and only while the buffer is a spectator, or
its entry was removed.  Writing to another file is left alone:
then the buffer visits that file."
  (let* ((buffer (or (buffer-base-buffer) (current-buffer)))
         (state (gethash buffer presenced--buffers))
         (entry (and state (gethash (presenced--buffer-topic state) presenced--entries)))
         (file (or file (buffer-file-name buffer))))
    (when (and entry
               (not presenced--writing-anyway)
               (presenced--guarded-p entry state)
               file
               (equal (presenced-resolve-file file) (presenced--buffer-path state)))
      (with-current-buffer buffer
        ;; `set-visited-file-name' of its own file marked it modified;
        ;; without changes of its own it still holds the file as read.
        (when (and (buffer-modified-p)
                   (eql (buffer-chars-modified-tick) (presenced--buffer-read-tick state)))
          (set-buffer-modified-p nil)))
      (user-error "%s" (presenced--guard-message buffer entry)))))

;; Where the guard sits, and why.  `before-save-hook' cannot refuse:
;; `basic-save-buffer' runs it inside `with-demoted-errors', so an error
;; there only becomes a message and the file is written.  A local
;; `write-file-functions' is cleared by `set-visited-file-name', so
;; `write-file' to the same file would pass it; a local
;; `write-contents-functions' is cleared by any change of major mode.
;; The default value of `write-contents-functions' refuses every save,
;; `write-file' to the same file included, but only of a buffer with
;; changes, and only after `basic-save-buffer' has asked whether to
;; write over a file changed on disk.  So the guard is advice run
;; before `basic-save-buffer', which every save goes through
;; (`save-buffer', `write-file', `save-some-buffers' and so quitting),
;; with the default `write-contents-functions' as a second line.
;; `write-file' gets its own advice, run first: before it reaches
;; `basic-save-buffer' it has given the buffer its name again, marked
;; it modified and made it writable, which a refused write must not
;; leave behind.  And `write-region', under `append-to-file' and any
;; program writing a file, gets advice too: a write to a guarded
;; buffer's own file is refused unless it is that buffer's save itself
;; (within `basic-save-buffer', past its guard) or the override.

(defun presenced--guard-write-file (filename &rest _)
  "Refuse `write-file' of a spectator's buffer to its own file, up front.
FILENAME is where `write-file' would write: a folder means the
buffer's file name in it, nil or empty the buffer's own file."
  (presenced--refuse-write
   (cond ((or (null filename) (string-empty-p filename)) nil)
         ((directory-name-p filename)
          (expand-file-name (file-name-nondirectory (or buffer-file-name (buffer-name)))
                            filename))
         (t (expand-file-name filename)))))

(defun presenced--guard-save (save &rest args)
  "Refuse a spectator's save, before anything else `basic-save-buffer' does.
Ahead of its check of a buffer that has no changes (so the user
learns why), and of its question about a file changed on disk.
SAVE is `basic-save-buffer', called with ARGS when the save may go
on: its writes of the buffer's file are then the save itself."
  (presenced--refuse-write)
  (let ((presenced--saving (or (buffer-base-buffer) (current-buffer))))
    (apply save args)))

(defun presenced--guard-write-region (_start _end filename &rest _)
  "Refuse `write-region' to the file of a buffer whose writes are guarded.
FILENAME is where it writes.  `append-to-file' and programs writing
the file directly meet this; the buffer's own save, and
`presenced-write-anyway', pass."
  (when (and (stringp filename)
             (not presenced--writing-anyway)
             (not (file-remote-p filename)))
    (let ((guarded nil))
      ;; Cheap first: most of the time no buffer is guarded, and then
      ;; the target's path need not be resolved.
      (maphash (lambda (buffer state)
                 (let ((entry (gethash (presenced--buffer-topic state) presenced--entries)))
                   (when (and entry
                              (not (eq buffer presenced--saving))
                              (buffer-live-p buffer)
                              (presenced--guarded-p entry state))
                     (push (cons buffer entry) guarded))))
               presenced--buffers)
      (when guarded
        (let* ((path (ignore-errors (presenced-resolve-file filename)))
               (hit (cl-find-if (lambda (pair)
                                  (equal path (presenced--buffer-path
                                               (gethash (car pair) presenced--buffers))))
                                guarded)))
          (when hit
            (user-error "%s" (presenced--guard-message (car hit) (cdr hit)))))))))

(defun presenced--guard-write-contents ()
  "Refuse a spectator's save from `write-contents-functions'.
A second line behind `presenced--guard-save'; nil lets the save go on."
  (presenced--refuse-write)
  nil)

(defun presenced--on-save ()
  "After a save: note what was written, and tell the others.
As owner, or writing anyway as a spectator: the others follow any
entry's `saved_at', so that none keeps the text written over."
  (let* ((buffer (current-buffer))
         (state (gethash buffer presenced--buffers)))
    (if (not state)
        (presenced--attach buffer t)
      (presenced--record-read buffer)
      (let ((entry (gethash (presenced--buffer-topic state) presenced--entries)))
        (when (and entry
                   (or (equal (presenced--role entry) "owner")
                       presenced--writing-anyway)
                   (equal (presenced-resolve-file buffer-file-name)
                          (presenced--buffer-path state)))
          (presenced--set-meta-fields
           entry `(("saved_at" . ,(presenced--now-ms))
                   ("saves" . ,(cl-incf (presenced--entry-saves entry))))))))))

;;;; Leaving

(defun presenced--leave-all ()
  "Leave every topic, and wait a little for the daemon to confirm.
So that the next in line is promoted by a clean `untrack'."
  (cl-incf presenced--generation)
  (presenced--stop-retrying)
  (let ((process presenced--process))
    (when process
      (maphash (lambda (_topic entry)
                 (when (presenced--entry-ref entry)
                   (presenced--request `((op . "untrack")
                                         (topic . ,(presenced--entry-topic entry))
                                         (ref . ,(presenced--entry-ref entry))))))
               presenced--entries))
    (maphash (lambda (buffer _state) (presenced--unrestrict buffer)) presenced--buffers)
    (clrhash presenced--buffers)
    (clrhash presenced--entries)
    (clrhash presenced--by-ref)
    (setq presenced--orphans nil
          presenced--link-state 'idle
          presenced--outage nil
          presenced--reconnecting nil
          presenced--link-error nil)
    (when (and process (process-live-p process))
      (presenced--wait (lambda () (zerop (hash-table-count presenced--pending)))
                       presenced-leave-wait))
    (presenced--close)))

;;;; Public functions and commands

(defun presenced-state (&optional buffer)
  "What the package knows of BUFFER (default: the current one), or nil.
An alist of `topic', `key', `status' (joining, joined, unreachable,
refused or removed), `role' (owner or spectator), `position' (0 for
the owner), `suspended' (t for the owner of a topic shared across
hosts held back while its daemon cannot reach etcd: its role is
spectator, its position 0), `owner' (an alist of `key', `pid',
`user', `joined_at' and `phx_ref', its entry's ref as the daemon
last named it),
`ref', `error', `connection' (idle, connecting, up or reconnecting),
`socket' and `restricted' (whether the package keeps the buffer
read-only).  Fields without a value are left out, but `restricted'
is always there."
  (let* ((buffer (or buffer (current-buffer)))
         (state (gethash buffer presenced--buffers))
         (entry (and state (gethash (presenced--buffer-topic state) presenced--entries))))
    (when entry
      (let* ((status (presenced--entry-status entry))
             (joined (eq status 'joined))
             (standing (presenced--entry-standing entry))
             (owner (and joined (presenced--get standing "owner")))
             (position (and joined (presenced--position entry)))
             (error (if (eq status 'refused)
                        (presenced--entry-error entry)
                      presenced--link-error)))
        (cl-remove-if
         (lambda (field) (and (null (cdr field)) (not (eq (car field) 'restricted))))
         `((topic . ,(presenced--entry-topic entry))
           (key . ,(presenced--entry-key entry))
           (status . ,(symbol-name status))
           (role . ,(and joined (presenced--get standing "role")))
           (position . ,position)
           (suspended . ,(presenced--suspended-p entry))
           (owner . ,(and (hash-table-p owner)
                          `((key . ,(gethash "key" owner))
                            (pid . ,(gethash "pid" owner))
                            (user . ,(gethash "user" owner))
                            (joined_at . ,(gethash "joined_at" owner))
                            (phx_ref . ,(gethash "phx_ref" owner)))))
           (ref . ,(presenced--entry-ref entry))
           (error . ,error)
           (connection . ,(if presenced--reconnecting
                              "reconnecting"
                            (symbol-name presenced--link-state)))
           (socket . ,(presenced-socket-path))
           (restricted . ,(and (presenced--buffer-restricted state) t))))))))

(defun presenced--position (entry)
  "ENTRY's place in the queue, 0 for the owner, as the daemon last said.
The daemon sends a `role' event whenever it changes, someone ahead
leaving included."
  (presenced--get (presenced--entry-standing entry) "position"))

(defun presenced-status (&optional buffer)
  "A short text of BUFFER's standing (default: the current buffer).
`owner', `owner, 2 watching', `spectator #1 (owner: alice, pid 4242)',
`suspended (etcd unreachable)', `joining', `no daemon', `not tracked'
or `removed', with `, reconnecting' while the daemon is away; \"\"
for buffers not followed.  Interactively, show it with the topic and daemon."
  (interactive)
  (let* ((state (presenced-state buffer))
         (text
          (if (null state)
              ""
            (concat
             (pcase (alist-get 'status state)
               ("joined"
                (if (equal (alist-get 'role state) "owner")
                    (let* ((entry (gethash (alist-get 'topic state) presenced--entries))
                           (watching (max 0 (1- (hash-table-count
                                                 (presenced--entry-metas entry))))))
                      (if (> watching 0) (format "owner, %d watching" watching) "owner"))
                  (if (alist-get 'suspended state)
                      "suspended (etcd unreachable)"
                    (let ((owner (alist-get 'owner state)))
                      (format "spectator #%s (owner: %s, pid %s)"
                              (or (alist-get 'position state) 0)
                              (alist-get 'key owner) (alist-get 'pid owner))))))
               ("joining" "joining")
               ("unreachable" "no daemon")
               ("removed" "removed (M-x presenced-join to queue again)")
               (_ "not tracked"))
             (if (equal (alist-get 'connection state) "reconnecting")
                 ", reconnecting"
               "")))))
    (when (called-interactively-p 'interactive)
      (if (null state)
          (presenced--say "this buffer is not on any topic (daemon socket: %s, %s)"
                          (presenced-socket-path) presenced--link-state)
        (presenced--say "%s: %s; topic %s, key %s, ref %s; daemon %s: %s%s"
                        (presenced--display-name (or buffer (current-buffer)))
                        text (alist-get 'topic state) (alist-get 'key state)
                        (or (alist-get 'ref state) "none")
                        (alist-get 'socket state) (alist-get 'connection state)
                        (if (alist-get 'error state)
                            (format " (%s)" (alist-get 'error state))
                          ""))))
    text))

(defun presenced--mode-line ()
  "The mode line's presenced part for the current buffer."
  (let ((status (presenced-status)))
    (if (string-empty-p status) "" (format " presenced[%s]" status))))

(defun presenced-write-anyway ()
  "Write the buffer to its file although another editor owns it.
Asks first, through `presenced-confirm-function', naming the owner;
then records the override in the entry's meta (`overrode'), which
`presence log' shows, and writes.  Once written, the meta's
`saved_at' and `saves' say so, as after an owner's save, and the
other spectators read the file again."
  (interactive)
  (let* ((buffer (or (buffer-base-buffer) (current-buffer)))
         (state (gethash buffer presenced--buffers))
         (entry (and state (gethash (presenced--buffer-topic state) presenced--entries))))
    (if (not (and entry (presenced--guarded-p entry state)))
        (with-current-buffer buffer (save-buffer))
      (let* ((owner (presenced--owner entry))
             (name (presenced--display-name buffer)))
        (unless (funcall presenced-confirm-function
                         (if (hash-table-p owner)
                             (format "presenced: %s is editing %s. Write your copy over it anyway? "
                                     (presenced--who owner) name)
                           (format "presenced: nobody is known to own %s now. Write your copy over it anyway? "
                                   name)))
          (user-error "%s" (format "presenced: %s was not written" name)))
        ;; Logged before the write, whoever owns it; without a place on
        ;; the topic it is sent after the resume, or with the next track.
        (let ((overrode (make-hash-table :test #'equal))
              (answered nil))
          (when (hash-table-p owner)
            (puthash "owner" (gethash "key" owner) overrode)
            (puthash "owner_pid" (gethash "pid" owner) overrode))
          (puthash "at" (presenced--now-ms) overrode)
          (presenced--set-meta-fields entry `(("overrode" . ,overrode))
                                      (lambda (_reply) (setq answered t)))
          (presenced--wait (lambda () answered) presenced-join-wait))
        (with-current-buffer buffer
          (let ((presenced--writing-anyway t)
                ;; The owner's Emacs may hold the file's lock; the user
                ;; chose to write anyway, so do not ask about it.
                (create-lockfiles nil))
            ;; The user chose to write over whatever is on disk now.
            (set-visited-file-modtime)
            (set-buffer-modified-p t)
            (save-buffer)))))))

(defun presenced-join ()
  "Queue the current buffer again on its topic.
After its entry was removed, or when the daemon could not be reached."
  (interactive)
  (let* ((state (gethash (current-buffer) presenced--buffers))
         (entry (and state (gethash (presenced--buffer-topic state) presenced--entries))))
    (cond
     ((null entry)
      (presenced--attach (current-buffer) t)
      (unless (gethash (current-buffer) presenced--buffers)
        (user-error "%s" "presenced: this buffer visits no file that has a topic")))
     ((memq (presenced--entry-status entry) '(joining joined))
      (presenced--say "%s is already on %s (%s)" (presenced--display-name (current-buffer))
                      (presenced--entry-topic entry) (presenced-status)))
     (t
      (setf (presenced--entry-status entry) 'joining
            (presenced--entry-removed-by entry) nil)
      (setf (presenced--buffer-last-message state) nil)
      (if (eq presenced--link-state 'up)
          (presenced--track entry)
        (presenced--connect))
      (presenced--wait (lambda () (not (eq (presenced--entry-status entry) 'joining)))
                       presenced-join-wait)))))

(defun presenced-reconnect ()
  "Try the daemon again after it could not be reached."
  (interactive)
  (presenced--connect))

(defvar presenced--mode-line-entry '(:eval (presenced--mode-line))
  "The mode line construct of `presenced-mode'.")
(put 'presenced--mode-line-entry 'risky-local-variable t)

;;;###autoload
(define-minor-mode presenced-mode
  "Join a presenced topic for every file buffer, owner or spectator.
The first editor on a file owns it; later ones get a read-only
buffer that names the owner in the mode line, cannot save it, and
become editable (read again from disk if it changed) when the owner
goes.  See the Commentary of presenced.el."
  :global t
  :lighter presenced--mode-line-entry
  (if presenced-mode
      (progn
        (add-hook 'find-file-hook #'presenced--on-find-file)
        (add-hook 'after-set-visited-file-name-hook #'presenced--on-rename)
        (add-hook 'after-revert-hook #'presenced--on-revert)
        (add-hook 'after-save-hook #'presenced--on-save)
        (add-hook 'kill-buffer-hook #'presenced--on-kill-buffer)
        (add-hook 'kill-emacs-hook #'presenced--leave-all)
        ;; The default value: `write-contents-functions' is buffer-local
        ;; wherever it is set, so `add-hook' called in a buffer that has
        ;; it would only add to that buffer's.
        (set-default 'write-contents-functions
                     (cons #'presenced--guard-write-contents
                           (remq #'presenced--guard-write-contents
                                 (default-value 'write-contents-functions))))
        (advice-add 'basic-save-buffer :around #'presenced--guard-save)
        (advice-add 'write-region :before #'presenced--guard-write-region)
        (advice-add 'write-file :before #'presenced--guard-write-file)
        (dolist (buffer (buffer-list))
          (when (buffer-local-value 'buffer-file-name buffer)
            (presenced--attach buffer t))))
    (remove-hook 'find-file-hook #'presenced--on-find-file)
    (remove-hook 'after-set-visited-file-name-hook #'presenced--on-rename)
    (remove-hook 'after-revert-hook #'presenced--on-revert)
    (remove-hook 'after-save-hook #'presenced--on-save)
    (remove-hook 'kill-buffer-hook #'presenced--on-kill-buffer)
    (remove-hook 'kill-emacs-hook #'presenced--leave-all)
    (set-default 'write-contents-functions
                 (remq #'presenced--guard-write-contents
                       (default-value 'write-contents-functions)))
    (advice-remove 'basic-save-buffer #'presenced--guard-save)
    (advice-remove 'write-file #'presenced--guard-write-file)
    (advice-remove 'write-region #'presenced--guard-write-region)
    (presenced--leave-all)))

(provide 'presenced)
;;; presenced.el ends here
