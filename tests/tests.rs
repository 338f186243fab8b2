//! The end-to-end tests, one module per file of this folder, built as one
//! test binary: the harness in `common` is compiled once, and `cargo test
//! --test tests MODULE::` runs one file's tests (for example `cargo test
//! --test tests identity::`).
//!
//! All of them share one process and run on parallel threads. So no test
//! changes anything process-wide (the environment, the current folder,
//! the umask, a resource limit, signal dispositions, a namespace): what
//! must run so is done in a child, before its `exec` or in a run of this
//! binary of its own, as tests/identity.rs does.

mod common;

mod architecture;
mod bad_input;
mod chaos;
mod cli_completion;
mod cli_entries;
mod cli_join;
mod cli_output;
mod cli_run;
mod cli_setup;
mod cli_stop;
mod cli_watch_all;
mod cli_who;
mod client_example;
mod client_trust;
mod cluster_bridge;
mod cluster_daemons;
mod cluster_fencing;
mod cluster_gateway;
mod cluster_lease;
mod cluster_mirror;
mod cluster_restart;
mod daemon_lifecycle;
mod database_faults;
mod defects;
mod editors;
mod emacs_package;
mod generated_files;
mod history;
mod identity;
mod layering;
mod limits;
mod ownership;
mod package;
mod permissions;
mod quotas;
mod removed;
mod restart;
mod slow_readers;
mod socket_file;
mod start_out_of_descriptors;
mod systemd;
mod text;
