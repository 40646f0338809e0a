//! Faults in airlock's dependencies, each under writes, each ending in recovery with
//! every committed change in the lake (and the spine) exactly once, in commit order,
//! and each visible in `/status` while it lasts:
//!
//! - the network path to PostgreSQL cut mid-stream (a TCP proxy in this test drops
//!   every connection, then refuses new ones for a while) and PostgreSQL restarted;
//! - the built-in spine (`airlock spine serve`) killed with SIGKILL and kept down for
//!   `AIRLOCK_SPINE_OUTAGE_SECS` (default 60), then started again;
//! - the S3 object store (moto) unreachable (its network path refused), frozen
//!   (SIGSTOP: requests hang until timeouts), then back, and unreachable while the
//!   host starts (it waits for the lake before streaming). moto keeps its objects in
//!   memory, so killing its process would wipe the lake itself: a freeze and a cut
//!   path are the faults a store that keeps its data can have;
//! - a full disk under a `file://` lake: a real 2 MiB tmpfs mounted for the test
//!   (as root), grown with `mount -o remount` when the test frees it.

use airlock_tests::lake_support;
use airlock_tests::source_support as support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_tests::spine_support::SpineProcess;
use airlock_tests::*;
use anyhow::{Context, Result, bail, ensure};
use lake_support::{Moto, read_s3_table};
use serde_json::Value as Json;
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy on 127.0.0.1 that can drop every connection it carries and refuse new
/// ones: a network path that can be cut.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (up2, connections2) = (up.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    // The path is cut: the connection is closed at once.
                    drop(inbound);
                    continue;
                }
                let handle = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                connections2.lock().unwrap().push(handle);
            }
        });
        Proxy {
            port,
            up,
            connections,
            task,
        }
    }

    /// Drops every connection in flight (both sockets close mid-stream).
    fn cut(&self) {
        for handle in self.connections.lock().unwrap().drain(..) {
            handle.abort();
        }
    }

    /// While down, new connections are closed as soon as they arrive.
    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

fn free_admin() -> String {
    format!("127.0.0.1:{}", airlock::demo::cluster::free_port())
}

/// The ids of `rows`, checked to be each change once (by `_lsn`).
fn ids_once(rows: &[Json]) -> Vec<i64> {
    let lsns: HashSet<i64> = rows.iter().map(|r| r["_lsn"].as_i64().unwrap()).collect();
    assert_eq!(lsns.len(), rows.len(), "a change appears twice");
    rows.iter().map(|r| r["id"].as_i64().unwrap()).collect()
}

/// Inserts ids `from..=to` into `t`, one transaction each.
async fn insert(db: &tokio_postgres::Client, from: i64, to: i64) -> Result<()> {
    for id in from..=to {
        db.execute(
            "INSERT INTO t (id, email) VALUES ($1, $2)",
            &[&id, &format!("u{id}@example.com")],
        )
        .await?;
    }
    Ok(())
}

/// Inserts ids from `first` on, one transaction each, pausing between rows, until
/// [`Writer::finish`].
struct Writer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<i64>>,
}

impl Writer {
    fn start(db: tokio_postgres::Client, first: i64, pause: Duration) -> Writer {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut id = first - 1;
            while !*stopped.borrow_and_update() {
                id += 1;
                insert(&db, id, id).await?;
                tokio::time::sleep(pause).await;
            }
            Ok(id)
        });
        Writer { stop, task }
    }

    /// Stops the writes; returns the last id written.
    async fn finish(self) -> Result<i64> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}

const TABLE: &str = "CREATE TABLE t (id bigint PRIMARY KEY, email text, pad text);
                     CREATE PUBLICATION airlock FOR TABLE t;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_network_path_mid_stream_loses_and_repeats_nothing() -> Result<()> {
    network_faults("faults-net", false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cuts_then_a_postgres_crash_lose_and_repeat_nothing() -> Result<()> {
    network_faults("faults-net-crash", true).await
}

/// Network cuts under writes; with `restart`, then a fast restart and a crash of PostgreSQL.
async fn network_faults(name: &str, restart: bool) -> Result<()> {
    let dir = temp_dir(name);
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(TABLE).await?;
    db.batch_execute("SELECT pg_create_logical_replication_slot('net', 'pgoutput')")
        .await?;
    // A witness slot nobody consumes: what PostgreSQL itself streams, for the failure message.
    db.batch_execute("SELECT pg_create_logical_replication_slot('witness', 'pgoutput')")
        .await?;
    let proxy = Proxy::start(pg.port).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port);
    let admin = free_admin();
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        support::config(&url, &dir, "net", "")
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\"")),
    )?;
    // The real binary, with its log kept for the failure message.
    let log = dir.join("host.log");
    let mut host = std::process::Command::new(airlock_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "airlock=debug")
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;

    insert(&db, 1, 100).await?;
    // Cut mid-stream, over and over, while a writer commits.
    let writes = Writer::start(pg.connect("postgres").await?, 101, Duration::from_millis(5));
    for i in 0..8u64 {
        tokio::time::sleep(Duration::from_millis(300 + 150 * i)).await;
        proxy.cut();
    }
    // Then the path stays cut for a while.
    proxy.set_up(false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.set_up(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = writes.finish().await?;
    let mut total = last;
    if restart {
        // PostgreSQL restarts, fast and then the hard way (crash recovery).
        tokio::task::block_in_place(|| pg.restart())?;
        let db = pg.connect("postgres").await?;
        insert(&db, last + 1, last + 50).await?;
        tokio::task::block_in_place(|| {
            pg.stop_server("immediate").and_then(|()| pg.start_server())
        })?;
        total = last + 50;
    }
    let db = pg.connect("postgres").await?;
    insert(&db, total + 1, total + 50).await?;
    let total = total + 50;

    let table = dir.join("lake/public.t");
    let drained = wait_for_lake(&table, Duration::from_secs(120), |r| {
        r.len() >= total as usize
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = read_lake("duckdb", &table)?;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &host.id().to_string()])
        .status();
    let _ = host.wait();
    let ids: HashSet<i64> = rows.iter().filter_map(|r| r["id"].as_i64()).collect();
    let missing: Vec<i64> = (1..=total).filter(|id| !ids.contains(id)).collect();
    let mut witness = String::new();
    if !missing.is_empty() {
        let db = pg.connect("postgres").await?;
        let in_table = db
            .query("SELECT id FROM t WHERE id = ANY($1)", &[&missing])
            .await?
            .len();
        let mut streamed = 0;
        for row in db
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes('witness', NULL, NULL,
                   'proto_version', '1', 'publication_names', 'airlock')",
                &[],
            )
            .await?
        {
            let bytes: Vec<u8> = row.get(0);
            if let Ok(airlock::source::pgoutput::Message::Insert(insert)) =
                airlock::source::pgoutput::decode(&bytes)
                && let Some(airlock::source::pgoutput::TupleValue::Text(id)) =
                    insert.new.iter().next()
                && missing.iter().any(|m| m.to_string().as_bytes() == id)
            {
                streamed += 1;
            }
        }
        witness = format!(
            "; of the missing rows, {in_table} are in the table and {streamed} in PostgreSQL's own stream (a witness slot)"
        );
    }
    assert!(
        drained.is_ok() && missing.is_empty(),
        "{} of {total} rows in the lake; missing {missing:?}{witness}; host log in {}",
        rows.len(),
        log.display()
    );
    assert_eq!(
        ids_once(&rows),
        (1..=total).collect::<Vec<_>>(),
        "every row once, in commit order"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_shows_in_status_while_it_lasts() -> Result<()> {
    let dir = temp_dir("faults-net-status");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(TABLE).await?;
    let proxy = Proxy::start(pg.port).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port);
    let admin = free_admin();
    let config = support::config(&url, &dir, "netstatus", "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\""));
    let host = Host::start(&config, &dir);
    wait_status(&admin, Duration::from_secs(30), "streaming", |s| {
        s["source"]["state"] == "streaming"
    })
    .await?;
    proxy.set_up(false);
    insert(&db, 1, 10).await?;
    let s = wait_status(&admin, Duration::from_secs(30), "the source outage", |s| {
        s["source"]["state"] == "retrying"
            && s["last_error"]["component"] == "source"
            && s["source"]["slot_health"] == "unknown"
    })
    .await?;
    // The cause, with where: the address the host cannot reach.
    let message = s["last_error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("127.0.0.1:{}", proxy.port)) && message.contains("retrying in"),
        "{s:#}"
    );
    // No figures read before the outage pass for current ones.
    assert!(s["source"]["lag_bytes"].is_null(), "{s:#}");
    assert!(s["source"]["current_wal_lsn"].is_null(), "{s:#}");
    assert!(
        s["source"]["slot_health_error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("127.0.0.1:{}", proxy.port))),
        "{s:#}"
    );
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    assert!(
        !metrics.contains("\nairlock_source_lag_bytes "),
        "no lag metric while unknown: {metrics}"
    );
    proxy.set_up(true);
    let s = wait_status(&admin, Duration::from_secs(60), "the recovery", |s| {
        s["source"]["state"] == "streaming"
            && s["last_error"].is_null()
            && s["source"]["slot_health"] == "ok"
    })
    .await?;
    assert!(s["source"]["lag_bytes"].is_u64(), "{s:#}");
    host.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spine_down_for_minutes_shows_its_backlog_and_gets_every_event_when_back() -> Result<()> {
    let outage = Duration::from_secs(
        std::env::var("AIRLOCK_SPINE_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let dir = temp_dir("faults-spine");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(TABLE).await?;
    db.batch_execute("SELECT pg_create_logical_replication_slot('spinedown', 'pgoutput')")
        .await?;
    let spine_dir = dir.join("spine");
    std::fs::create_dir_all(&spine_dir)?;
    let spine_port = spine_support::free_port();
    let spine = SpineProcess::start(&spine_dir, spine_port).await?;
    let plugins = plugin_dir(
        &dir,
        &[
            ("10-mask", "mask", ""),
            ("20-route", "route", "spine_tables = [\"public.t\"]\n"),
        ],
    );
    let admin = free_admin();
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"spinedown\"\nstatus_interval = \"1s\"\n[plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\nroutes = [\"default\", \"restricted\"]\nflush_interval = \"200ms\"\n\
         [sinks.spine]\ntype = \"http\"\nurl = \"{}\"\nflush_interval = \"200ms\"\nrequest_timeout = \"2s\"\n\
         [admin]\nlisten = \"{admin}\"\n",
        pg.url("postgres"),
        plugins.display(),
        dir.display(),
        spine.url
    );
    let host = Host::start(&config, &dir);
    let writes = Writer::start(pg.connect("postgres").await?, 1, Duration::from_millis(20));
    wait_status(&admin, Duration::from_secs(30), "events delivered", |s| {
        s["sinks"]["spine"]["durable_lsn"].is_string()
    })
    .await?;
    // SIGKILL mid-stream; the writes go on for the whole outage.
    spine.kill_9().await;
    let down_at = Instant::now();
    let s = wait_status(
        &admin,
        Duration::from_secs(30),
        "the spine retrying with its error",
        |s| {
            let spine = &s["sinks"]["spine"];
            spine["retrying"] == true && spine["last_error"].as_str().is_some_and(|e| !e.is_empty())
        },
    )
    .await?;
    eprintln!("spine outage in /status: {:#}", s["sinks"]["spine"]);
    // The backlog shows as the source's lag: committed changes wait in the slot and in
    // front of the sink. (The sink's own `queued_batches` stays 0 while it retries: see
    // `the_backlog_in_front_of_a_retrying_sink_shows_in_status`.)
    let s = wait_status(
        &admin,
        outage.max(Duration::from_secs(10)),
        "the lag growing behind the spine",
        |s| {
            s["source"]["lag_seconds"].as_f64().is_some_and(|l| l > 3.0)
                && s["sinks"]["spine"]["retrying"] == true
        },
    )
    .await?;
    eprintln!(
        "spine backlog in /status: {:#} {:#}",
        s["source"], s["sinks"]["spine"]
    );
    let durable_during = s["sinks"]["spine"]["durable_lsn"].clone();
    if let Some(left) = outage.checked_sub(down_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    // Still retrying, nothing acknowledged past what the spine has.
    let s = admin_status(&admin).await.context("/status")?;
    assert_eq!(s["sinks"]["spine"]["retrying"], true, "{s:#}");
    assert_eq!(s["sinks"]["spine"]["durable_lsn"], durable_during, "{s:#}");

    let spine = SpineProcess::start(&spine_dir, spine_port).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = writes.finish().await?;
    let table = dir.join("lake/public.t");
    let rows = match wait_for_lake(&table, Duration::from_secs(180), |r| {
        r.len() >= last as usize
    })
    .await
    {
        Ok(rows) => rows,
        Err(e) => bail!(
            "{} of {last} rows; /status: {:#}",
            e.to_string().lines().next().unwrap_or(""),
            admin_status(&admin).await.unwrap_or_default()
        ),
    };
    let start = Instant::now();
    let events = loop {
        let events: Json = reqwest::get(format!("{}?source=airlock&limit=100000", spine.url))
            .await?
            .json()
            .await?;
        let events = events.as_array().cloned().unwrap_or_default();
        if events.len() >= last as usize || start.elapsed() > Duration::from_secs(120) {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    wait_status(&admin, Duration::from_secs(30), "the recovery", |s| {
        s["sinks"]["spine"]["retrying"] == false && s["sinks"]["spine"]["queued_batches"] == 0
    })
    .await?;
    host.stop().await?;
    assert_eq!(ids_once(&rows), (1..=last).collect::<Vec<_>>());
    let event_ids: Vec<i64> = events
        .iter()
        .map(|e| e["payload"]["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        event_ids,
        (1..=last).collect::<Vec<_>>(),
        "every event once, in commit order"
    );
    for e in &events {
        let id = e["payload"]["new"]["id"].as_i64().unwrap();
        assert_eq!(
            e["payload"]["new"]["email"],
            Json::from(sha256_hex(&format!("u{id}@example.com")))
        );
    }
    spine.kill_9().await;
    Ok(())
}

/// SIGSTOP / SIGCONT to a process.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_frozen_object_store_shows_in_status_and_loses_nothing() -> Result<()> {
    let dir = temp_dir("faults-s3");
    let moto = Moto::start();
    moto.create_bucket("lake").await?;
    let proxy = Proxy::start(moto.port).await;
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(TABLE).await?;
    db.batch_execute("SELECT pg_create_logical_replication_slot('s3faults', 'pgoutput')")
        .await?;
    let mut options = moto.storage_options();
    options.insert(
        "AWS_ENDPOINT_URL".into(),
        format!("http://127.0.0.1:{}", proxy.port),
    );
    // Short client timeouts and few retries inside the object store client, so a
    // failing request reaches the sink (which retries forever) in seconds.
    for (k, v) in [
        ("timeout", "3s"),
        ("connect_timeout", "1s"),
        ("max_retries", "1"),
        ("retry_timeout", "2s"),
    ] {
        options.insert(k.into(), v.into());
    }
    let options_toml: Vec<String> = options
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\""))
        .collect();
    let admin = free_admin();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"s3faults\"\nstatus_interval = \"1s\"\n[plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"s3://lake/faults\"\nflush_interval = \"200ms\"\ncompact_min_files = 1000\n\
         storage_options = {{ {} }}\n[admin]\nlisten = \"{admin}\"\n",
        pg.url("postgres"),
        plugins.display(),
        options_toml.join(", ")
    );
    let host = Host::start(&config, &dir);
    let writes = Writer::start(pg.connect("postgres").await?, 1, Duration::from_millis(20));
    wait_status(&admin, Duration::from_secs(60), "a first commit", |s| {
        s["sinks"]["lake"]["durable_lsn"].is_string()
    })
    .await?;

    // The store's network path is cut.
    proxy.set_up(false);
    let s = wait_status(
        &admin,
        Duration::from_secs(60),
        "the lake retrying with its error and the lag growing",
        |s| {
            let lake = &s["sinks"]["lake"];
            lake["retrying"] == true
                && lake["last_error"].as_str().is_some_and(|e| !e.is_empty())
                && s["source"]["lag_seconds"].as_f64().is_some_and(|l| l > 2.0)
        },
    )
    .await?;
    eprintln!(
        "object store unreachable, /status: {:#}",
        s["sinks"]["lake"]
    );
    proxy.set_up(true);
    wait_status(&admin, Duration::from_secs(60), "the recovery", |s| {
        s["sinks"]["lake"]["retrying"] == false
    })
    .await?;

    // The store freezes: requests hang until the client's timeout.
    let pid = moto.pid();
    signal(pid, "-STOP");
    let frozen = wait_status(
        &admin,
        Duration::from_secs(60),
        "the lake retrying while the store hangs",
        |s| s["sinks"]["lake"]["retrying"] == true,
    )
    .await;
    signal(pid, "-CONT");
    let s = frozen?;
    eprintln!("object store frozen, /status: {:#}", s["sinks"]["lake"]);

    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = writes.finish().await?;
    let url = "s3://lake/faults/public.t";
    let start = Instant::now();
    let rows = loop {
        let rows = read_s3_table(url, &moto.storage_options())?;
        if rows.len() >= last as usize || start.elapsed() > Duration::from_secs(120) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    host.stop().await?;
    assert_eq!(ids_once(&rows), (1..=last).collect::<Vec<_>>());

    // A start while the store is unreachable: what the lake holds must be known
    // before streaming, so the host waits, retrying and saying so, then streams.
    proxy.set_up(false);
    let host = Host::start(&config, &dir);
    let s = wait_status(
        &admin,
        Duration::from_secs(60),
        "the lake retrying at start, before streaming",
        |s| {
            let lake = &s["sinks"]["lake"];
            lake["retrying"] == true && lake["last_error"].as_str().is_some_and(|e| !e.is_empty())
        },
    )
    .await?;
    eprintln!("object store unreachable at start, /status: {s:#}");
    assert_ne!(
        s["source"]["state"], "streaming",
        "streaming waits for the lake"
    );
    ensure!(!host.is_finished(), "the host gave up instead of retrying");
    proxy.set_up(true);
    insert(&db, last + 1, last + 3).await?;
    let start = Instant::now();
    let rows = loop {
        let rows = read_s3_table(url, &moto.storage_options())?;
        if rows.len() >= last as usize + 3 || start.elapsed() > Duration::from_secs(120) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    host.stop().await?;
    assert_eq!(ids_once(&rows), (1..=last + 3).collect::<Vec<_>>());
    Ok(())
}

/// A tmpfs mounted at a directory for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("cannot run mount")?;
        ensure!(
            out.status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) -> Result<()> {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_lake_shows_in_status_and_loses_nothing_once_space_is_back()
-> Result<()> {
    let dir = temp_dir("faults-disk");
    let lake = dir.join("lake");
    let disk = Tmpfs::mount(&lake, "2m")?;
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(TABLE).await?;
    db.batch_execute("SELECT pg_create_logical_replication_slot('disk', 'pgoutput')")
        .await?;
    let admin = free_admin();
    let config = support::config(&pg.url("postgres"), &dir, "disk", "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\""));
    let host = Host::start(&config, &dir);
    // About 1 KB of hard-to-compress text per row: the 2 MiB disk fills within a few thousand rows.
    let fill = "INSERT INTO t (id, email, pad)
                SELECT g, 'u' || g || '@example.com',
                       (SELECT string_agg(md5(g::text || '-' || k), '') FROM generate_series(1, 32) k)
                FROM generate_series($1::bigint, $2::bigint) g";
    let mut next = 1i64;
    let start = Instant::now();
    let full = loop {
        db.execute(fill, &[&next, &(next + 199)]).await?;
        next += 200;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(s) = admin_status(&admin).await {
            let lake = &s["sinks"]["lake"];
            if lake["retrying"] == true {
                break s;
            }
        }
        ensure!(
            !host.is_finished(),
            "the host stopped instead of waiting for space"
        );
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "the 2 MiB disk never filled ({} rows written)",
            next - 1
        );
    };
    let error = full["sinks"]["lake"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    eprintln!("disk full, /status: {:#}", full["sinks"]["lake"]);
    assert!(
        error.contains("No space left on device") || error.contains("os error 28"),
        "the error names the cause: {error}"
    );
    // More writes while full: they wait in the slot and in front of the sink.
    db.execute(fill, &[&next, &(next + 199)]).await?;
    next += 200;
    wait_status(&admin, Duration::from_secs(30), "a backlog", |s| {
        s["sinks"]["lake"]["queued_batches"]
            .as_u64()
            .is_some_and(|n| n > 0)
            || s["sinks"]["lake"]["retrying"] == true
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!host.is_finished(), "the host waits for space");

    disk.resize("256m")?;
    let total = (next - 1) as usize;
    let table = lake.join("public.t");
    wait_for_lake(&table, Duration::from_secs(120), |r| r.len() >= total).await?;
    wait_status(&admin, Duration::from_secs(30), "the recovery", |s| {
        s["sinks"]["lake"]["retrying"] == false
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = read_lake("duckdb", &table)?;
    host.stop().await?;
    assert_eq!(ids_once(&rows), (1..=total as i64).collect::<Vec<_>>());
    drop(disk);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_in_front_of_a_retrying_sink_shows_in_status() -> Result<()> {
    let dir = temp_dir("faults-backlog");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(TABLE).await?;
    let plugins = plugin_dir(
        &dir,
        &[("20-route", "route", "spine_tables = [\"public.t\"]\n")],
    );
    let admin = free_admin();
    // Nothing listens where the spine should be.
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"backlog\"\nstatus_interval = \"1s\"\n[plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\n\
         [sinks.spine]\ntype = \"http\"\nurl = \"http://127.0.0.1:{}/events\"\nflush_interval = \"200ms\"\n\
         [admin]\nlisten = \"{admin}\"\n",
        pg.url("postgres"),
        plugins.display(),
        spine_support::free_port()
    );
    let host = Host::start(&config, &dir);
    wait_status(&admin, Duration::from_secs(30), "streaming", |s| {
        s["source"]["state"] == "streaming"
    })
    .await?;
    for id in 1..=50 {
        insert(&db, id, id).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = wait_status(&admin, Duration::from_secs(30), "a backlog", |s| {
        s["sinks"]["spine"]["retrying"] == true
            && s["sinks"]["spine"]["queued_batches"]
                .as_u64()
                .is_some_and(|n| n > 0)
    })
    .await;
    // A graceful stop would wait for the spine to take what it holds, and nothing
    // listens there: end the host as if killed (the slot keeps the rest).
    host.abort();
    s.map(|_| ())
}

/// A spine that lists no events and refuses every write with `400`: a definite
/// failure, which no retry mends.
async fn refusing_spine() -> Result<String> {
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    // The policy's own events are taken (airlock registers its policy at start);
    // every change is refused.
    let refuse = |body: axum::body::Bytes| async move {
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let events = body
            .as_array()
            .cloned()
            .unwrap_or_else(|| vec![body.clone()]);
        if events.iter().all(|e| e["source"] == "airlock.policy") {
            (StatusCode::CREATED, axum::Json(body))
        } else {
            let refused = serde_json::json!({"detail": "refused by this spine"});
            (StatusCode::BAD_REQUEST, axum::Json(refused))
        }
    };
    let app = axum::Router::new()
        .route(
            "/events",
            get(|| async { axum::Json(serde_json::json!([])) }).post(refuse),
        )
        .route("/events/batch", post(refuse));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/events"))
}

/// A sink that fails for good while the database is quiet stops the run at once with
/// that sink's error, though the other sink is healthy and nothing more is written:
/// the source does not wait for the next transaction to notice, nor for the failed
/// sink to catch up. The slot is acknowledged to no position past the row the sink
/// did not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_fails_for_good_stops_the_run_at_once() -> Result<()> {
    let dir = temp_dir("faults-definite");
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(TABLE).await?;
    let plugins = plugin_dir(
        &dir,
        &[("20-route", "route", "spine_tables = [\"public.t\"]\n")],
    );
    let spine = refusing_spine().await?;
    let admin = free_admin();
    let config = format!(
        "[policy]\ndefault = \"allow\"\n[source]\nurl = \"{}\"\nslot = \"definite\"\nstatus_interval = \"1s\"\n[plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{}\"\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{}/lake\"\nroutes = [\"default\", \"restricted\"]\nflush_interval = \"200ms\"\n\
         [sinks.audit]\ntype = \"http\"\nurl = \"{spine}\"\nflush_interval = \"200ms\"\nkey_file = \"{}/spine.key\"\n\
         [admin]\nlisten = \"{admin}\"\n",
        pg.url("postgres"),
        plugins.display(),
        dir.display(),
        dir.display(),
    );
    let host = Host::start(&config, &dir);
    wait_slot_active(&db, "definite").await?;
    let before_row: String = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    insert(&db, 1, 1).await?;
    let written = Instant::now();
    let failure = host.failure().await?;
    let took = written.elapsed();
    ensure!(
        failure.contains("audit") && failure.contains("400"),
        "the run's error names the sink and its cause: {failure}"
    );
    ensure!(
        took < Duration::from_secs(20),
        "the run took {took:?} to stop after the sink failed"
    );
    let behind: bool = db
        .query_one(
            "SELECT confirmed_flush_lsn <= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'definite'",
            &[&before_row],
        )
        .await?
        .get(0);
    ensure!(
        behind,
        "the slot was acknowledged past a row the spine never took"
    );
    Ok(())
}
