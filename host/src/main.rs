//! The `airlock` command: parses arguments, loads configuration, sets up logging and
//! hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "A one-way, governed pipeline out of PostgreSQL"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
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
}

/// How to reach a running host's admin API.
#[derive(clap::Args)]
struct AdminArgs {
    /// The host's configuration: its [admin] listen address and token are used.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The admin API address, when not taken from --config.
    #[arg(long, default_value = "127.0.0.1:8090")]
    admin: String,
    /// Bearer token for the admin API.
    #[arg(long, env = "AIRLOCK_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl AdminArgs {
    /// The admin address and the token to send: the configured one, `--token`, or the
    /// per-run token a host without one keeps for its own user.
    fn resolve(&self) -> anyhow::Result<(String, Option<String>)> {
        let (addr, token) = match &self.config {
            Some(path) => {
                let config = airlock::config::Config::load(path)?;
                (
                    config.admin.listen.to_string(),
                    config.admin.token.or_else(|| self.token.clone()),
                )
            }
            None => (self.admin.clone(), self.token.clone()),
        };
        let token = token.or_else(|| addr.parse().ok().and_then(airlock::admin::read_local_token));
        Ok((addr, token))
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let (addr, token) = self.resolve()?;
        // Redirects are not followed: the answer must be the admin API's own.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut request = client.request(method, format!("http://{addr}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Ok(request)
    }
}

async fn send(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let (addr, _) = admin.resolve()?;
    let response = admin.request(method, path)?.send().await.with_context(|| {
        format!("cannot reach the admin API at {addr}: is `airlock run` running there?")
    })?;
    let code = response.status().as_u16();
    let body = response
        .json()
        .await
        .context("the admin API answered with something other than JSON")?;
    if code == 401 {
        anyhow::bail!(
            "the admin API refused the request: pass its token with --token or AIRLOCK_ADMIN_TOKEN"
        );
    }
    Ok((code, body))
}

#[derive(Subcommand)]
enum SpineCommand {
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

#[derive(Subcommand)]
enum GuestCommand {
    /// Run a guest (or a folder of guests, in file-name order) on changes given as JSON
    /// lines on stdin; print the results as JSON lines. Guest logs go to stderr.
    Test {
        /// A `.wasm` component or a plugin folder.
        plugin: PathBuf,
        /// A setting for the guest(s), `key=value`; repeat for more.
        #[arg(long = "setting", value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    airlock::config::parse_duration(text)
        .ok_or_else(|| format!("`{text}` is not a duration: use e.g. 30s, 2m, 500ms"))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,airlock=info"));
    // Progress bars (snapshot, compaction) only for a person at a terminal; log
    // lines are then written above the bars.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if matches!(format, LogFormat::Text) && terminal {
        airlock::progress::enable_bars();
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(airlock::progress::LogWriter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A shutdown signal: true after the first SIGINT/SIGTERM; a second one exits at once
/// (safe: the slot keeps everything that was not acknowledged).
fn shutdown_signal() -> watch::Receiver<bool> {
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

async fn guest_test(plugin: PathBuf, settings: Vec<String>) -> anyhow::Result<()> {
    let extra: Vec<(String, String)> = settings
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--setting `{s}`: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    tokio::task::spawn_blocking(move || {
        // The output goes to the guest's developer, not out of airlock: any route and
        // tag name is shown as written.
        let limits = airlock::pipeline::runtime::Limits {
            names: std::sync::Arc::new(airlock::pipeline::names::Names::unchecked()),
            ..Default::default()
        };
        let runtime =
            airlock::pipeline::runtime::Runtime::new(limits, airlock::config::default_cache_dir())?;
        let files = if plugin.is_dir() {
            airlock::pipeline::scan(&plugin)?
        } else {
            let name = plugin
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let toml = plugin.with_extension("toml");
            vec![airlock::pipeline::PluginFile {
                name,
                settings: toml.is_file().then_some(toml),
                wasm: plugin.clone(),
            }]
        };
        let mut pipeline =
            airlock::pipeline::Pipeline::load(&runtime, &files, &extra).map_err(|errors| {
                anyhow::anyhow!(
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })?;
        let stdin = std::io::stdin().lock();
        let stdout = std::io::stdout().lock();
        airlock::pipeline::harness::run(&mut pipeline, stdin, stdout)?;
        Ok(())
    })
    .await?
}

async fn check(path: PathBuf) -> anyhow::Result<()> {
    let config = match airlock::config::Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            print!("{e}");
            anyhow::bail!("{} is not valid: fix the problems above", path.display());
        }
    };
    let findings = airlock::check::check(&config).await;
    for finding in &findings {
        println!("{finding}");
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} problem{} found",
            if failed == 1 { "" } else { "s" }
        );
    }
    println!("all checks passed");
    Ok(())
}

async fn main_async(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = airlock::config::Config::load(&config)?;
            airlock::run(config, shutdown_signal()).await?;
        }
        Command::Demo {
            duration,
            dir,
            guests,
        } => {
            let options = airlock::demo::DemoOptions {
                duration,
                dir,
                guests,
            };
            airlock::demo::run(options, shutdown_signal()).await?;
        }
        Command::Check { config } => check(config).await?,
        Command::Status { admin, json } => {
            let (_, body) = send(&admin, reqwest::Method::GET, "/status").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                let report: airlock::status::StatusReport = serde_json::from_value(body)
                    .context("the admin API's /status is not a status report")?;
                print!("{}", report.render());
            }
        }
        Command::Reload { admin } => {
            let (code, body) = send(&admin, reqwest::Method::POST, "/reload").await?;
            if code == 200 {
                println!(
                    "reloaded: pipeline {}",
                    body["version"].as_str().unwrap_or("?")
                );
            } else {
                anyhow::bail!(
                    "reload refused: {}",
                    body["error"].as_str().unwrap_or("unknown error")
                );
            }
        }
        Command::Guest {
            command: GuestCommand::Test { plugin, settings },
        } => guest_test(plugin, settings).await?,
        Command::Catalog { config, json } => {
            let config = airlock::config::Config::load(&config)?;
            let catalog = airlock::sink::lake::catalog(&config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&catalog.to_json())?);
            } else {
                print!("{}", catalog.render_table());
            }
        }
        Command::Compact { config, token } => {
            let admin = AdminArgs {
                config: Some(config.clone()),
                admin: String::new(),
                token,
            };
            match send(&admin, reqwest::Method::POST, "/compact").await {
                Ok((200, body)) => println!(
                    "compacted by the running host:\n{}",
                    serde_json::to_string_pretty(&body["tables"])?
                ),
                Ok((_, body)) => anyhow::bail!(
                    "the running host refused: {}",
                    body["error"].as_str().unwrap_or("unknown error")
                ),
                Err(error) if format!("{error:#}").contains("cannot reach the admin API") => {
                    eprintln!(
                        "no host answers at the admin address; compacting directly under the lake's lock"
                    );
                    let config = airlock::config::Config::load(&config)?;
                    let reports = airlock::sink::lake::compact_offline(&config).await?;
                    println!("{}", serde_json::to_string_pretty(&reports)?);
                }
                Err(error) => return Err(error),
            }
        }
        Command::Spine {
            command: SpineCommand::Serve { dir, listen, token },
        } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| {
                    format!("cannot listen on {listen}: choose a free address with --listen")
                })?;
            eprintln!(
                "spine serving {} on http://{}",
                dir.display(),
                listener.local_addr()?
            );
            let mut stop = shutdown_signal();
            airlock::spine::serve(&dir, listener, token, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await?;
        }
        Command::Spine {
            command: SpineCommand::Verify { dir },
        } => {
            let report = airlock::spine::verify(&dir)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.valid {
                anyhow::bail!(
                    "the spine's log is not intact: {} (record {})",
                    report.reason.as_deref().unwrap_or("unknown reason"),
                    report
                        .first_break_at
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
    }
    Ok(())
}

/// Caps glibc's malloc at two arenas unless `MALLOC_ARENA_MAX` says otherwise.
///
/// By default glibc gives each thread that allocates under contention its own arena,
/// up to eight per core, and memory freed into one arena is not reused by the others.
/// Rows are decoded on one thread, edited on the pipeline thread and freed on the
/// runtime's, so freed memory piles up in arenas that no longer allocate. Streaming a
/// 2,000,000-row transaction (`bench_e2e --only memory`) peaked at 250 MiB RSS with
/// glibc's default and 221 MiB with two arenas, and two arenas drained 1,000,000 rows
/// no slower (`--only drain`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` only sets an allocator tunable; it runs first in `main`,
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    airlock::private_files::restrict_umask();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
