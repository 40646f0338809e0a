//! The `airlock` command line: its arguments, logging, signals, and which part of
//! the library each command runs. `main.rs` only parses and hands over.

mod admin_client;
mod commands;
mod scaffold;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

pub use admin_client::{AdminArgs, AdminError, send as admin_request};

/// The command line.
#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "A one-way, governed pipeline out of PostgreSQL"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What to do.
#[derive(Subcommand)]
pub enum Command {
    /// Run the pipeline described by a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL with sample data and run the example pipeline on live traffic.
    Demo {
        /// Stop after this long (e.g. `30s`, `2m`); default: run until Ctrl-C.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Where the demo writes its configuration, plugins and lake.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Folder with the built example guests (`cargo xtask guests` builds them into guests/dist).
        #[arg(long)]
        guests: Option<PathBuf>,
    },
    /// Validate a configuration file and compile every plugin; lists every problem.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show what a running host is doing: source, lag, pipeline stages, sinks, errors.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON of /status.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running host to rebuild its pipeline from the plugin folder now.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the lake's tables: columns, types, tags, row counts, latest version.
    Catalog {
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compact the lake now: through the running host's admin API, or, with no host
    /// running, directly under the lake's compaction lock.
    Compact {
        #[arg(long, short)]
        config: PathBuf,
        /// Bearer token for the admin API.
        #[arg(long, env = "AIRLOCK_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// The built-in audit spine: serve it, or verify its hash chain.
    Spine {
        #[command(subcommand)]
        command: SpineCommand,
    },
    /// Work with guests.
    Guest {
        #[command(subcommand)]
        command: GuestCommand,
    },
    /// The policy's helpers in PostgreSQL.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Copy tables' existing rows into the lake again while the stream runs (an
    /// incremental snapshot). The request travels in the slot's own stream, so it is
    /// taken in order, also by an airlock that is stopped now; waits and shows
    /// progress until the copies are durable. Needs `[source] snapshot = "initial"`.
    Snapshot {
        #[arg(long, short)]
        config: PathBuf,
        /// Tables as `schema.table` (or `table` in `public`); each must be published.
        #[arg(required = true)]
        tables: Vec<String>,
        /// Return once the request is written, without waiting for the copies.
        #[arg(long)]
        no_wait: bool,
    },
    /// Who changed each row: the function and triggers that tell airlock.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
}

/// `airlock identity …`.
#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Create the identity function (owned by the role airlock_identity), add its
    /// trigger to every published table, and revoke pg_logical_emit_message from
    /// PUBLIC so no one else can forge an identity (needs a superuser; safe to run
    /// again).
    Install {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the SQL instead of running it (to review, or to apply by hand).
        #[arg(long)]
        print: bool,
    },
    /// Remove all of it, and give PUBLIC back pg_logical_emit_message.
    Uninstall {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the SQL instead of running it.
        #[arg(long)]
        print: bool,
    },
}

/// `airlock policy …`.
#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Add the event trigger that reports column comment changes to airlock in stream
    /// order (needs a superuser; safe to run again).
    Install {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the SQL instead of running it (to review, or to apply by hand).
        #[arg(long)]
        print: bool,
    },
    /// Remove that event trigger.
    Uninstall {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the SQL instead of running it.
        #[arg(long)]
        print: bool,
    },
}

/// `airlock spine …`.
#[derive(Subcommand)]
pub enum SpineCommand {
    /// Serve the built-in spine (audit-stream-py's API, durable, hash-chained).
    Serve {
        /// Where the spine keeps its log.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8093")]
        listen: String,
        /// Bearer token required for reads and writes.
        #[arg(long, env = "AIRLOCK_SPINE_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Verify a spine's log: finds any edited, deleted, inserted or reordered record.
    Verify {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `airlock guest …`.
#[derive(Subcommand)]
pub enum GuestCommand {
    /// Run a guest (or a folder of guests, in file-name order) on changes given as JSON
    /// lines on stdin; print the results as JSON lines. Guest logs go to stderr.
    Test {
        /// A `.wasm` component or a plugin folder.
        plugin: PathBuf,
        /// A setting for the guest(s), `key=value`; repeat for more.
        #[arg(long = "setting", value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// Compare the output with this file (one JSON line per row, `pipeline` left
        /// out) instead of printing it; fail on the first difference.
        #[arg(long, value_name = "FILE")]
        expect: Option<PathBuf>,
    },
    /// Write a new guest folder: a working guest on the bulk calls, its build script,
    /// a test input and its expected output.
    New {
        /// The guest's language: rust, python, js or c.
        #[arg(long)]
        lang: String,
        /// The guest's name (lowercase letters, digits, `-`, `_`): the folder, the
        /// `.wasm` and the plugin's name.
        name: String,
        /// Where to create the folder.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
        .ok_or_else(|| format!("`{text}` is not a duration: use e.g. 30s, 2m, 500ms"))
}

/// Logging to stderr, filtered by `RUST_LOG` (default `warn,airlock=info`), with
/// progress bars when stderr is a terminal.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,airlock=info"));
    // Progress bars (snapshot, compaction) only for a person at a terminal; log
    // lines are then written above the bars.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if matches!(format, LogFormat::Text) && terminal {
        crate::progress::enable_bars();
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(crate::progress::LogWriter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A shutdown signal: true after the first SIGINT/SIGTERM; a second one exits at once
/// (safe: the slot keeps everything that was not acknowledged).
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                tracing::info!(
                    "shutting down: draining in-flight batches (signal again to exit at once)"
                );
                let _ = tx.send(true);
            } else {
                tracing::warn!(
                    "second signal: exiting now; unacknowledged changes stay in the slot"
                );
                std::process::exit(130);
            }
        }
    });
    rx
}

/// Runs the parsed command to its end.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = crate::config::Config::load(&config)?;
            crate::run(config, shutdown_signal()).await?;
        }
        Command::Demo {
            duration,
            dir,
            guests,
        } => {
            let options = crate::demo::DemoOptions {
                duration,
                dir,
                guests,
            };
            crate::demo::run(options, shutdown_signal()).await?;
        }
        Command::Check { config } => commands::check(config).await?,
        Command::Snapshot {
            config,
            tables,
            no_wait,
        } => commands::snapshot(config, tables, no_wait).await?,
        Command::Status { admin, json } => commands::status(admin, json).await?,
        Command::Reload { admin } => commands::reload(admin).await?,
        Command::Guest {
            command:
                GuestCommand::Test {
                    plugin,
                    settings,
                    expect,
                },
        } => commands::guest_test(plugin, settings, expect).await?,
        Command::Guest {
            command: GuestCommand::New { lang, name, dir },
        } => {
            let root = scaffold::new_guest(&lang, &name, &dir)?;
            println!(
                "wrote {root}: build it with `{root}/build.sh`, then test it with\n  \
                 airlock guest test {root}/{name}.wasm --expect {root}/test/expected.jsonl < {root}/test/input.jsonl",
                root = root.display()
            );
        }
        Command::Catalog { config, json } => commands::catalog(config, json).await?,
        Command::Compact { config, token } => commands::compact(config, token).await?,
        Command::Spine {
            command: SpineCommand::Serve { dir, listen, token },
        } => commands::spine_serve(dir, listen, token, shutdown_signal()).await?,
        Command::Spine {
            command: SpineCommand::Verify { dir },
        } => commands::spine_verify(dir)?,
        Command::Policy {
            command: PolicyCommand::Install { config, print },
        } => {
            commands::apply_sql(
                config,
                print,
                "policy install",
                "installed the policy's comment trigger",
                |_| crate::policy::install::INSTALL.to_owned(),
            )
            .await?
        }
        Command::Policy {
            command: PolicyCommand::Uninstall { config, print },
        } => {
            commands::apply_sql(
                config,
                print,
                "policy uninstall",
                "uninstalled the policy's comment trigger",
                |_| crate::policy::install::UNINSTALL.to_owned(),
            )
            .await?
        }
        Command::Identity {
            command: IdentityCommand::Install { config, print },
        } => {
            commands::apply_sql(
                config,
                print,
                "identity install",
                "installed identity (function, triggers on every published table, emit privileges)",
                |config| {
                    let user = config
                        .and_then(|c| c.source.connect_config().ok())
                        .map(|c| c.user.clone());
                    crate::identity::install::install_sql(user.as_deref())
                },
            )
            .await?
        }
        Command::Identity {
            command: IdentityCommand::Uninstall { config, print },
        } => {
            commands::apply_sql(
                config,
                print,
                "identity uninstall",
                "uninstalled identity",
                |_| crate::identity::install::UNINSTALL.to_owned(),
            )
            .await?
        }
    }
    Ok(())
}
