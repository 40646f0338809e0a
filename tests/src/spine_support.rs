//! Spines for the spine tests and the spine benchmark, all on 127.0.0.1: the built-in
//! spine in this process, the `airlock spine serve` binary as a child process (to kill
//! it with SIGKILL), and the real audit-stream-py (the `audit-stream` package from
//! PyPI). Plus hand-built batches, so no PostgreSQL is needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock::change::{
    Change, Column, Lsn, Op, Relation, ReplicaIdentity, Transaction, TxnMeta, Value, oid,
};
use airlock::pipeline::batch::Batch;
use airlock::spine::client::SpineClient;
use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

/// The command that installs audit-stream-py (the README's test setup runs it).
pub const AUDIT_STREAM_PIP: &str = "python3 -m pip install audit-stream==0.1.0";

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A client for the spine whose events endpoint is `url`.
pub fn client(url: &str) -> SpineClient {
    SpineClient::new(url, None, Duration::from_secs(30)).expect("spine client")
}

/// Polls `GET /healthz` until it answers or `timeout` passes.
pub async fn wait_healthy(url: &str, timeout: Duration) -> Result<()> {
    let client = client(url);
    let start = Instant::now();
    loop {
        match client.get("/healthz").await {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > timeout => {
                bail!("spine at {url} not healthy within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The built-in spine served by this process.
pub struct BuiltinSpine {
    /// The events endpoint, `http://127.0.0.1:PORT/events`.
    pub url: String,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), airlock::spine::server::SpineError>>,
}

impl BuiltinSpine {
    /// Serves the spine in `dir` on a free port.
    pub async fn start(dir: &Path) -> BuiltinSpine {
        BuiltinSpine::start_on(dir, "127.0.0.1:0".parse().expect("address")).await
    }

    /// Serves the spine in `dir` on `addr` (to come back on the same port).
    pub async fn start_on(dir: &Path, addr: SocketAddr) -> BuiltinSpine {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let owned = dir.to_path_buf();
        let task = tokio::spawn(async move {
            airlock::spine::server::serve(&owned, listener, None, async move {
                let _ = stopped.await;
            })
            .await
        });
        let url = format!("http://{addr}/events");
        wait_healthy(&url, Duration::from_secs(10))
            .await
            .expect("built-in spine starts");
        BuiltinSpine {
            url,
            addr,
            dir: dir.to_path_buf(),
            stop: Some(stop),
            task,
        }
    }

    /// Shuts the spine down gracefully and waits until its log is closed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("built-in spine stops within 30 s")
            .expect("spine task")
            .expect("spine served without error");
    }
}

/// Fails with the install command when audit-stream-py is not installed.
pub fn require_audit_stream_py() {
    let found = std::process::Command::new("python3")
        .args(["-c", "import audit_stream, uvicorn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "audit-stream-py is not installed: run `{AUDIT_STREAM_PIP}` (the README's test setup does)"
    );
}

/// The real audit-stream-py (`python3 -m audit_stream`, uvicorn) as a child process.
/// It keeps events in memory only: a restart starts empty.
pub struct AuditStreamPy {
    /// The events endpoint, `http://127.0.0.1:PORT/events`.
    pub url: String,
    pub port: u16,
    child: Child,
    /// Its stderr, removed when it is dropped.
    log: PathBuf,
}

impl Drop for AuditStreamPy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

impl AuditStreamPy {
    /// Starts it on a free port.
    pub async fn start() -> AuditStreamPy {
        AuditStreamPy::start_on(free_port()).await
    }

    /// Starts it on `port` (`HOST`/`PORT` environment variables, as its `__main__` reads them).
    pub async fn start_on(port: u16) -> AuditStreamPy {
        require_audit_stream_py();
        let log = std::env::temp_dir().join(format!("airlock-audit-stream-{port}.log"));
        let child = Command::new("python3")
            .args(["-m", "audit_stream"])
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log)
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run python3 -m audit_stream: {e}; install it with `{AUDIT_STREAM_PIP}`"
                )
            });
        let url = format!("http://127.0.0.1:{port}/events");
        if let Err(e) = wait_healthy(&url, Duration::from_secs(30)).await {
            panic!(
                "{e}; its log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        AuditStreamPy {
            url,
            port,
            child,
            log,
        }
    }

    /// Kills it (SIGKILL) and waits for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The `airlock` binary next to the test executable (`target/release/airlock`), or the
/// one named by `AIRLOCK_BIN`.
pub fn airlock_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("AIRLOCK_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/release/deps/..");
    let bin = dir.join("airlock");
    assert!(
        bin.is_file(),
        "{} is not built: run `cargo build --release -p airlock`",
        bin.display()
    );
    bin
}

/// `airlock spine serve --dir DIR --listen 127.0.0.1:PORT` as a child process.
pub struct SpineProcess {
    /// The events endpoint.
    pub url: String,
    child: Child,
    /// The server's stderr, beside its directory: removed with the process.
    log: PathBuf,
}

impl Drop for SpineProcess {
    fn drop(&mut self) {
        if std::env::var_os("AIRLOCK_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

impl SpineProcess {
    pub async fn start(dir: &Path, port: u16) -> Result<SpineProcess> {
        let bin = airlock_binary();
        let log = dir.with_extension("serve.log");
        let mut child = Command::new(&bin)
            .args(["spine", "serve", "--dir"])
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log)
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let url = format!("http://127.0.0.1:{port}/events");
        let start = Instant::now();
        while wait_healthy(&url, Duration::from_millis(200))
            .await
            .is_err()
        {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "`{} spine serve` exited with {status} (does the binary have the `spine serve` subcommand?): {}",
                    bin.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("`airlock spine serve` did not become healthy within 30 s");
            }
        }
        Ok(SpineProcess { url, child, log })
    }

    /// SIGKILL, no chance to flush or clean up.
    pub async fn kill_9(mut self) {
        let _ = self.child.kill().await;
    }
}

/// `public.accounts (id int8 key, email text, note text)`.
pub fn accounts() -> Arc<Relation> {
    let column = |name: &str, type_oid, key| Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        key,
    };
    Arc::new(Relation {
        comment_classes: Default::default(),
        oid: 16_400,
        schema: "public".into(),
        name: "accounts".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("id", oid::INT8, true),
            column("email", oid::TEXT, false),
            column("note", oid::TEXT, false),
        ],
    })
}

/// The masked form of an e-mail address (what the `mask` guest writes: SHA-256 hex).
pub fn masked(email: &str) -> String {
    crate::sha256_hex(email)
}

/// Transaction `n` (commit LSN `n × 1000 + 999`) inserting `rows` accounts with ids
/// `n × 1000 + i`, masked e-mails and `note`, every row routed to `spine` as a masking
/// guest and the route guest would leave it.
pub fn accounts_batch(n: u64, rows: u64, note: &str) -> Arc<Batch> {
    let relation = accounts();
    let changes = (0..rows)
        .map(|i| {
            let id = n * 1000 + i;
            Change {
                identity: None,
                relation: relation.clone(),
                op: Op::Insert,
                lsn: Lsn(n * 1000 + i),
                new: Some(vec![
                    Value::Int(id as i64),
                    Value::Text(masked(&format!("user{id}@example.com"))),
                    Value::Text(note.to_owned()),
                ]),
                old: None,
            }
        })
        .collect();
    let meta = TxnMeta {
        xid: n as u32,
        commit_lsn: Lsn(n * 1000 + 999),
        end_lsn: Lsn(n * 1000 + 1000),
        commit_ts: 1_704_067_200_000_000 + n as i64,
        part: airlock::change::Part::WHOLE,
        copied: None,
    };
    let mut batch = Batch::from_transactions([Transaction { meta, changes }]);
    batch.pipeline = "test-pipeline".into();
    batch.tables[0].column_tags[1] = vec!["pii".into()];
    for row in &mut batch.rows {
        row.routes = vec!["default".into(), "spine".into()];
    }
    Arc::new(batch)
}

/// The end LSN of [`accounts_batch`] `n`.
pub fn accounts_end(n: u64) -> Lsn {
    Lsn(n * 1000 + 1000)
}
