//! Security, through the real binaries over real HTTP:
//!
//! - the admin API (`airlock run`) and the built-in spine (`airlock spine serve`)
//!   refuse every request without the right bearer token when one is configured
//!   (health probes excepted);
//! - the credentials — the PostgreSQL password, the spine token, the S3 keys — never
//!   appear in the host's log (at debug level), in `airlock check`'s output or its
//!   errors, in `/status` or `/metrics`, in the lake, or in the spine's log;
//! - a guest in the running host cannot read files, open sockets or see the
//!   environment that holds those credentials (the `escape` guest reports what it got).

use airlock_tests::lake_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlock_tests::spine_support::free_port;
use airlock_tests::*;
use anyhow::{Context, Result, bail};
use lake_support::{Moto, read_s3_table};
use serde_json::Value as Json;

const PG_PASSWORD: &str = "pg-Secret-7f3a9c1e";
const SPINE_TOKEN: &str = "spine-Secret-41be07d2";
const ADMIN_TOKEN: &str = "admin-Secret-c0ffee99";
const S3_SECRET_KEY: &str = "s3-Secret-9d8e7f6a5b";
const S3_KEY_ID: &str = "AKIASECRETKEYID0001";

/// The admin API or spine at `url`, polled until it answers at all.
async fn wait_answering(url: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if reqwest::get(url).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not answer within {timeout:?}")
}

/// A cluster where role `airlock` logs in with a SCRAM password only.
async fn cluster_with_password() -> Result<Cluster> {
    let pg = cluster();
    let db = pg.connect("postgres").await?;
    db.batch_execute(&format!(
        "CREATE ROLE airlock WITH LOGIN REPLICATION PASSWORD '{PG_PASSWORD}';
         CREATE TABLE t (id bigint PRIMARY KEY, email text);
         GRANT SELECT ON t TO airlock;
         CREATE PUBLICATION airlock FOR TABLE t;"
    ))
    .await?;
    let hba = pg.dir.join("data/pg_hba.conf");
    let rest = std::fs::read_to_string(&hba)?;
    std::fs::write(
        &hba,
        format!(
            "host all airlock 127.0.0.1/32 scram-sha-256\nhost replication airlock 127.0.0.1/32 scram-sha-256\n{rest}"
        ),
    )?;
    db.batch_execute("SELECT pg_reload_conf()").await?;
    // Without the password the role is refused: the password really is needed.
    let mut config = pg.pg_config("postgres");
    config.user("airlock");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        config.connect(tokio_postgres::NoTls).await.is_err(),
        "role airlock must need its password"
    );
    Ok(pg)
}

/// Every credential the test hands airlock.
const SECRETS: [&str; 5] = [
    PG_PASSWORD,
    SPINE_TOKEN,
    ADMIN_TOKEN,
    S3_SECRET_KEY,
    S3_KEY_ID,
];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} contains the credential `{secret}`:\n{}",
            text.chars().take(4000).collect::<String>()
        );
    }
}

fn assert_no_secret_in_files(dir: &Path) {
    for file in files_under(dir) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        for secret in SECRETS {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} contains the credential `{secret}`",
                file.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_the_admin_api_and_the_spine_and_no_credential_leaks_anywhere() -> Result<()> {
    let dir = temp_dir("security");
    let pg = cluster_with_password().await?;
    let moto = Moto::start();
    moto.create_bucket("lake").await?;

    // The built-in spine, with a token.
    let spine_dir = dir.join("spine");
    std::fs::create_dir_all(&spine_dir)?;
    let spine_port = free_port();
    let spine_url = format!("http://127.0.0.1:{spine_port}");
    let _spine = HostProcess(
        Command::new(airlock_bin())
            .args(["spine", "serve", "--dir"])
            .arg(&spine_dir)
            .args(["--listen", &format!("127.0.0.1:{spine_port}")])
            .env("AIRLOCK_SPINE_TOKEN", SPINE_TOKEN)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("spine.log"))?)
            .spawn()?,
    );
    wait_answering(&format!("{spine_url}/healthz"), Duration::from_secs(30)).await?;

    let plugins = plugin_dir(
        &dir,
        &[
            ("10-mask", "mask", ""),
            ("20-route", "route", "spine_tables = [\"public.t\"]\n"),
            ("30-escape", "test_escape", ""),
        ],
    );
    let admin = format!("127.0.0.1:{}", free_port());
    // S3 endpoint options in the file; the keys only in the environment.
    let config = dir.join("airlock.toml");
    std::fs::write(
        &config,
        format!(
            "[policy]\ndefault = \"allow\"\n[source]\nurl = \"postgres://airlock@127.0.0.1:{port}/postgres\"\npassword_env = \"AIRLOCK_PG_PASSWORD\"\n\
             slot = \"sec\"\nstatus_interval = \"1s\"\n\
             [plugins]\ntags = [\"pii\", \"pii:*\"]\ndir = \"{plugins}\"\n\
             [sinks.lake]\ntype = \"delta\"\nurl = \"s3://lake/secure\"\nroutes = [\"default\", \"restricted\"]\nflush_interval = \"200ms\"\n\
             storage_options = {{ AWS_ENDPOINT_URL = \"{endpoint}\", AWS_ALLOW_HTTP = \"true\", AWS_REGION = \"us-east-1\" }}\n\
             [sinks.spine]\ntype = \"http\"\nurl = \"{spine_url}/events\"\ntoken_env = \"AIRLOCK_SPINE_TOKEN\"\nflush_interval = \"200ms\"\n\
             [admin]\nlisten = \"{admin}\"\ntoken_env = \"AIRLOCK_ADMIN_TOKEN\"\n",
            port = pg.port,
            plugins = plugins.display(),
            endpoint = moto.endpoint(),
        ),
    )?;
    let secrets_env = [
        ("AIRLOCK_PG_PASSWORD", PG_PASSWORD),
        ("AIRLOCK_SPINE_TOKEN", SPINE_TOKEN),
        ("AIRLOCK_ADMIN_TOKEN", ADMIN_TOKEN),
        ("AWS_ACCESS_KEY_ID", S3_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
    ];

    // `airlock check` passes with the credentials and shows none of them.
    let out = Command::new(airlock_bin())
        .args(["check", "--config"])
        .arg(&config)
        .envs(secrets_env)
        .output()?;
    let check_output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "check failed:\n{check_output}");
    assert_no_secret("`airlock check`", &check_output);

    let log = dir.join("host.log");
    let mut host = HostProcess(
        Command::new(airlock_bin())
            .args(["run", "--config"])
            .arg(&config)
            .envs(secrets_env)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    wait_answering(&format!("http://{admin}/healthz"), Duration::from_secs(30)).await?;

    // The admin API: nothing but the probes without the token.
    let http = reqwest::Client::new();
    for path in ["/status", "/metrics"] {
        let url = format!("http://{admin}{path}");
        assert_eq!(
            http.get(&url).send().await?.status(),
            401,
            "{path} without a token"
        );
        assert_eq!(
            http.get(&url).bearer_auth("wrong").send().await?.status(),
            401,
            "{path} with a wrong token"
        );
        assert_eq!(
            http.get(&url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await?
                .status(),
            200,
            "{path} with the token"
        );
    }
    for path in ["/reload", "/compact"] {
        let url = format!("http://{admin}{path}");
        assert_eq!(
            http.post(&url).send().await?.status(),
            401,
            "{path} without a token"
        );
    }
    assert_eq!(
        http.get(format!("http://{admin}/healthz"))
            .send()
            .await?
            .status(),
        200
    );
    // The spine: reads and writes need its token.
    let event = serde_json::json!({"kind": "other", "source": "intruder", "payload": {"table": "x", "operation": "INSERT"}, "timestamp": "2024-01-01T00:00:00Z"});
    assert_eq!(
        http.post(format!("{spine_url}/events"))
            .json(&event)
            .send()
            .await?
            .status(),
        401
    );
    for path in ["/events", "/verify", "/stats"] {
        assert_eq!(
            http.get(format!("{spine_url}{path}"))
                .send()
                .await?
                .status(),
            401,
            "spine {path} without a token"
        );
    }

    // Data flows with every credential in use.
    let db = pg.connect("postgres").await?;
    for id in 1..=5i64 {
        db.execute(
            "INSERT INTO t VALUES ($1, $2)",
            &[&id, &format!("u{id}@example.com")],
        )
        .await?;
    }
    let start = Instant::now();
    let events = loop {
        let events: Json = http
            .get(format!("{spine_url}/events?limit=1000"))
            .bearer_auth(SPINE_TOKEN)
            .send()
            .await?
            .json()
            .await?;
        if events.as_array().is_some_and(|a| a.len() >= 5) {
            break events;
        }
        if let Ok(Some(status)) = host.0.try_wait() {
            bail!(
                "the host exited ({status}):\n{}",
                std::fs::read_to_string(&log)?
            );
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "events did not reach the spine:\n{}",
            std::fs::read_to_string(&log)?
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["source"] != "intruder"),
        "the refused event was not stored"
    );
    let start = Instant::now();
    let rows = loop {
        let mut options = moto.storage_options();
        options.insert("AWS_ACCESS_KEY_ID".into(), S3_KEY_ID.into());
        options.insert("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into());
        match read_s3_table("s3://lake/secure/public.t", &options) {
            Ok(rows) if rows.len() >= 5 => break rows,
            _ if start.elapsed() > Duration::from_secs(60) => bail!("rows did not reach the lake"),
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    };

    let status = http
        .get(format!("http://{admin}/status"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .text()
        .await?;

    // The guest ran inside the host that holds every credential, and got none of it.
    let host_log = std::fs::read_to_string(&log)?;
    let probe = host_log
        .lines()
        .find(|l| l.contains("escape.fs="))
        .with_context(|| format!("the escape guest's log line is missing:\n{host_log}"))?;
    assert!(
        probe.contains("escape.env=0"),
        "the guest saw environment variables: {probe}"
    );
    assert!(
        !probe.contains("escape.fs=read"),
        "the guest read a host file: {probe}"
    );
    assert!(
        !probe.contains("escape.net=connected"),
        "the guest opened a socket: {probe}"
    );
    assert!(
        probe.contains("escape.clock=0"),
        "the guest's clock is frozen: {probe}"
    );

    host.stop(Duration::from_secs(60))?;

    // A wrong password: the error says so and shows neither password.
    let wrong = "pg-Wrong-0b5e11";
    let out = Command::new(airlock_bin())
        .args(["check", "--config"])
        .arg(&config)
        .envs(secrets_env)
        .env("AIRLOCK_PG_PASSWORD", wrong)
        .output()?;
    let wrong_output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{wrong_output}");
    assert!(
        wrong_output.contains("password"),
        "the error names the password problem:\n{wrong_output}"
    );
    assert!(!wrong_output.contains(wrong), "{wrong_output}");
    // A password in the URL is shown masked.
    let url_config = dir.join("url-password.toml");
    std::fs::write(
        &url_config,
        std::fs::read_to_string(&config)?
            .replace(
                "postgres://airlock@",
                &format!("postgres://airlock:{PG_PASSWORD}@"),
            )
            .replace("password_env = \"AIRLOCK_PG_PASSWORD\"\n", "")
            .replace(
                "slot = \"sec\"",
                "slot = \"nosuchslot\"\ncreate_slot = false",
            ),
    )?;
    let out = Command::new(airlock_bin())
        .args(["check", "--config"])
        .arg(&url_config)
        .envs(
            secrets_env
                .iter()
                .filter(|(k, _)| *k != "AIRLOCK_PG_PASSWORD")
                .copied(),
        )
        .output()?;
    let url_output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the missing slot fails the check:\n{url_output}"
    );

    // At `RUST_LOG=debug` the deltalake S3 store logs its configuration with the access
    // key ID (never the secret key): that dependency line is the one exception.
    let plain_log = host_log.replace("\u{1b}[", "");
    let leaks: Vec<&str> = plain_log
        .lines()
        .filter(|l| l.contains(S3_KEY_ID) && !l.contains("deltalake_aws::storage"))
        .collect();
    assert!(
        leaks.is_empty(),
        "the access key ID in the host's log: {leaks:#?}"
    );
    assert_no_secret(
        "the host's debug log",
        &host_log.replace(S3_KEY_ID, "<key id>"),
    );
    assert_no_secret("/status", &status);
    assert_no_secret("/metrics", &metrics);
    assert_no_secret("`airlock check` with a password in the URL", &url_output);
    assert_no_secret("the lake", &serde_json::to_string(&rows)?);
    assert_no_secret("the spine's events", &events.to_string());
    assert_no_secret_in_files(&spine_dir);
    assert_no_secret(
        "the spine's log",
        &std::fs::read_to_string(dir.join("spine.log"))?,
    );
    Ok(())
}
