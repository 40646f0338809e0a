//! A throwaway PostgreSQL cluster for the demo and the tests: `initdb` into a
//! temporary directory, `wal_level = logical`, a free port on 127.0.0.1, stopped and
//! removed on drop. As root, initdb and postgres run as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries not found (looked for `pg_config --bindir` and /usr/lib/postgresql/*/bin): \
         install them, e.g. `apt-get install postgresql`"
    )]
    NoBinaries,
    #[error(
        "AIRLOCK_PG_BINDIR is {0:?}, which holds no `initdb`: point it at the folder with PostgreSQL's \
         server binaries, or unset it"
    )]
    NoBinariesIn(PathBuf),
    #[error("{step} failed: {message}")]
    Step { step: String, message: String },
}

/// A running throwaway cluster.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
    keep: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The setting that names the PostgreSQL binaries' folder, for the tests and the
/// demo (`cargo xtask test --pg 18` sets it).
pub const BINDIR_ENV: &str = "AIRLOCK_PG_BINDIR";

/// What a PostgreSQL build was built with, from its `pg_config --configure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Build {
    /// OpenSSL: the server can serve TLS.
    pub ssl: bool,
    /// libxml: the `xml` type accepts values.
    pub xml: bool,
}

impl Build {
    /// The build of the binaries in `bindir`; `None` when it has no `pg_config` to say.
    pub fn of(bindir: &Path) -> Option<Build> {
        let out = Command::new(bindir.join("pg_config"))
            .arg("--configure")
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let configure = String::from_utf8_lossy(&out.stdout);
        Some(Build {
            ssl: configure.contains("--with-openssl") || configure.contains("--with-ssl=openssl"),
            xml: configure.contains("--with-libxml"),
        })
    }
}

/// The directory with `initdb`, `pg_ctl` and `postgres`: [`BINDIR_ENV`] when set,
/// else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        return if dir.join("initdb").exists() {
            Ok(dir)
        } else {
            Err(ClusterError::NoBinariesIn(dir))
        };
    }
    system_bindir()
}

/// The system's PostgreSQL binaries, whatever [`BINDIR_ENV`] says: `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin`.
pub fn system_bindir() -> Result<PathBuf, ClusterError> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().ok_or(ClusterError::NoBinaries)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(55432)
}

impl Cluster {
    /// initdb + start, with `extra_conf` appended to postgresql.conf.
    pub fn start(extra_conf: &str) -> Result<Cluster, ClusterError> {
        Cluster::start_from(find_bindir()?, extra_conf)
    }

    /// [`Cluster::start`] with the binaries in `bin`.
    pub fn start_from(bin: PathBuf, extra_conf: &str) -> Result<Cluster, ClusterError> {
        let as_postgres = running_as_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("airlock-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| step("create the cluster directory", e))?;
        let port = free_port();
        let cluster = Cluster {
            dir,
            port,
            bin,
            as_postgres,
            keep: std::env::var_os("AIRLOCK_KEEP_CLUSTER").is_some(),
        };
        if as_postgres {
            cluster.run(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&cluster.dir),
            )?;
        }
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            cluster.pg("initdb").arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]),
        )?;
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nwal_level = logical\n\
             max_replication_slots = 20\nmax_wal_senders = 20\nfsync = off\nshared_buffers = 128MB\n\
             max_connections = 100\nlog_min_messages = warning\n{extra_conf}\n",
            cluster.dir.display()
        );
        append(&data.join("postgresql.conf"), &conf)
            .map_err(|e| step("write postgresql.conf", e))?;
        cluster.start_server()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<(), ClusterError> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| step(what, e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Step {
                step: what.to_owned(),
                message: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            })
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) -> Result<(), ClusterError> {
        let log = self.dir.join("postgres.log");
        self.run(
            "pg_ctl start",
            self.pg("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"]),
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(ClusterError::Step {
                    step: "wait for postgres".into(),
                    message: format!("see {}", log.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the server (`fast`: disconnect clients, checkpoint) or kills it (`immediate`).
    pub fn stop_server(&self, mode: &str) -> Result<(), ClusterError> {
        self.run(
            "pg_ctl stop",
            self.pg("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", mode, "-w", "stop"]),
        )
    }

    /// Restarts the server.
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.stop_server("fast")?;
        self.start_server()
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A tokio-postgres configuration for ordinary SQL.
    pub fn pg_config(&self, db: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(db);
        c
    }

    /// Connects with tokio-postgres and drives the connection in the background.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self.pg_config(db).connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// The server log so far, for failing tests.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop_server("immediate");
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn step(what: &str, e: std::io::Error) -> ClusterError {
    ClusterError::Step {
        step: what.to_owned(),
        message: e.to_string(),
    }
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())
}
