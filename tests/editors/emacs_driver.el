;;; emacs_driver.el --- Lets tests query a headless Emacs -*- lexical-binding: t; -*-

;; SPDX-License-Identifier: MIT OR Apache-2.0

;;; Commentary:

;; The Emacs counterpart of tests/editors/vim_driver.vim: tests/editors.rs
;; starts Emacs as a foreground daemon whose server listens on a socket
;; of the test's own, with the package and this driver loaded, and the
;; file on the command line (a daemon visits command-line files too, in
;; the order given, so the mode is on when the file is visited and the
;; file joins its topic as it opens):
;;
;;   emacs -Q --fg-daemon=/abs/emacs-0.sock -L /abs/editors/emacs \
;;     -l presenced -l /abs/tests/editors/emacs_driver.el \
;;     --eval '(setq presenced-program "/abs/target/debug/presence")' \
;;     --eval '(presenced-mode 1)' /abs/FILE
;;
;; with the environment of the other editors (HOME, XDG_*, PRESENCE_SOCKET,
;; PRESENCE_DB): the package reads PRESENCE_SOCKET and XDG_RUNTIME_DIR
;; when it connects.  Emacs prints its messages on stderr.  The server
;; answers once `emacsclient -s /abs/emacs-0.sock --eval 1' succeeds;
;; that may be while the file is still being visited (its wait for the
;; role lets the server in), so wait on what the test needs, such as
;; `(presenced-state)' having a role, not on the first answer.
;; A test then asks:
;;
;;   emacsclient -s /abs/emacs-0.sock --eval '(presenced-driver-eval "EXPR")'
;;
;; where EXPR is Emacs Lisp source put in an Emacs Lisp string: each `\'
;; becomes `\\' and each `"' becomes `\"' (nothing else needs escaping;
;; a newline may stay as it is).  EXPR is read and evaluated (lexical
;; binding) in the buffer of the selected window, which is the file
;; given on the command line (emacsclient's own evaluations run in the
;; server's process buffer otherwise).  Several forms can be given as
;; one `progn'.
;;
;; The answer is a JSON document, {"ok": VALUE} or {"error": "MESSAGE"}
;; (MESSAGE as `error-message-string' gives it: a `user-error' is only
;; its text), made pure ASCII (other characters as \uXXXX escapes), so
;; that emacsclient prints it as an Emacs Lisp string literal that is
;; also a valid JSON string literal: a test decodes emacsclient's
;; trimmed output as a JSON string, then that string as JSON.  In Rust:
;;
;;   let inner: String = serde_json::from_str(stdout.trim())?;
;;   let answer: Value = serde_json::from_str(&inner)?;
;;
;; VALUE is the evaluated value in JSON: nil and :false are false, t is
;; true, :null is null, numbers and strings are themselves, other
;; symbols their names, vectors are arrays, a hash table or a non-empty
;; list of pairs whose cars are symbols or strings (an alist such as
;; `presenced-state' gives) is an object, other lists are arrays (a
;; dotted pair is [car, cdr]), anything else is its printed form.
;;
;; An evaluation that kills Emacs (`(kill-emacs)', which runs
;; `kill-emacs-hook') answers nothing: emacsclient fails or prints
;; nothing.

;;; Code:

(require 'json)
(require 'subr-x)

(defun presenced-driver--alist-p (value)
  "Whether VALUE is a non-empty list of pairs keyed by symbols or strings."
  (and (consp value)
       (proper-list-p value)
       (seq-every-p (lambda (pair)
                      (and (consp pair)
                           (let ((key (car pair)))
                             (or (stringp key)
                                 (and (symbolp key) key (not (eq key t)))))))
                    value)))

(defun presenced-driver--key (key)
  "KEY of an alist as a JSON object's key: keywords lose their colon."
  (cond ((stringp key) key)
        ((keywordp key) (substring (symbol-name key) 1))
        (t (symbol-name key))))

(defun presenced-driver--jsonable (value)
  "VALUE as something `json-serialize' takes, in the driver's mapping."
  (cond
   ((eq value nil) :false)
   ((memq value '(t :false :null)) value)
   ((stringp value) (substring-no-properties value))
   ((integerp value) value)
   ((floatp value) (if (or (isnan value) (memq value '(1.0e+INF -1.0e+INF)))
                       (number-to-string value)
                     value))
   ((symbolp value) (symbol-name value))
   ((vectorp value) (vconcat (mapcar #'presenced-driver--jsonable value)))
   ((hash-table-p value)
    (let ((object (make-hash-table :test #'equal)))
      (maphash (lambda (key item)
                 (puthash (if (or (stringp key) (symbolp key))
                              (presenced-driver--key key)
                            (format "%S" key))
                          (presenced-driver--jsonable item)
                          object))
               value)
      object))
   ((presenced-driver--alist-p value)
    (let ((object (make-hash-table :test #'equal)))
      ;; The first of a repeated key wins, as with `alist-get'.
      (dolist (pair (reverse value))
        (puthash (presenced-driver--key (car pair))
                 (presenced-driver--jsonable (cdr pair))
                 object))
      object))
   ((proper-list-p value)
    (vconcat (mapcar #'presenced-driver--jsonable value)))
   ((consp value)
    (vector (presenced-driver--jsonable (car value))
            (presenced-driver--jsonable (cdr value))))
   (t (format "%S" value))))

(defun presenced-driver--ascii (json)
  "JSON text with every non-ASCII character as a \\uXXXX escape.
Such characters only occur inside JSON strings, where the escape
means the same character; beyond U+FFFF it is a surrogate pair."
  (replace-regexp-in-string
   "[^[:ascii:]]"
   (lambda (text)
     (let ((code (string-to-char text)))
       (if (> code #xFFFF)
           (let ((offset (- code #x10000)))
             (format "\\u%04x\\u%04x"
                     (+ #xD800 (ash offset -10))
                     (+ #xDC00 (logand offset #x3FF))))
         (format "\\u%04x" code))))
   json t t))

(defun presenced-driver--answer (answer)
  "ANSWER, an alist, as the driver's ASCII JSON text."
  (let ((json (json-serialize (presenced-driver--jsonable answer))))
    (presenced-driver--ascii
     (if (multibyte-string-p json) json (decode-coding-string json 'utf-8)))))

(defun presenced-driver-eval (expression)
  "Evaluate EXPRESSION, Lisp source, for a test; return the answer's JSON.
It runs in the buffer of the selected window.  The answer is
{\"ok\": VALUE} or {\"error\": MESSAGE}; see the Commentary."
  (condition-case err
      (let ((value (with-current-buffer (window-buffer (selected-window))
                     (eval (car (read-from-string expression)) t))))
        (condition-case err
            (presenced-driver--answer (list (cons 'ok value)))
          (error (presenced-driver--answer
                  (list (cons 'error (concat "the value has no JSON form: "
                                             (error-message-string err))))))))
    ((error quit)
     (presenced-driver--answer
      (list (cons 'error (error-message-string err)))))))

(defun presenced-driver-messages ()
  "The text of the *Messages* buffer."
  (with-current-buffer (messages-buffer)
    (buffer-substring-no-properties (point-min) (point-max))))

(provide 'emacs_driver)
;;; emacs_driver.el ends here
