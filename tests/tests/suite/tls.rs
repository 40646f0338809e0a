//! TLS to PostgreSQL, against a real cluster with `ssl = on` and a server certificate
//! signed by a CA made here with the `openssl` CLI: every `sslmode` on both kinds of
//! connection (our replication client and the tokio-postgres SQL connections), the
//! errors an operator sees (a wrong CA, a wrong host name, a server that wants TLS,
//! a server without TLS, a wrong password), and a host that snapshots and streams
//! over TLS with password authentication without ever showing the password in its
//! logs, its errors or `/status`. Authentication under attack: `require_auth` against
//! a server that downgrades the method, SCRAM channel binding against a relay that
//! terminates TLS in the middle, and client certificates.

use airlock_tests::source_support as support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use airlock::source::error::SourceError;
use airlock::source::protocol::{ConnectConfig, ReplicationConnection, SslMode};
use airlock_tests::*;
use anyhow::{Context, Result, ensure};

const PASSWORD: &str = "Tr0ub4dor-and-3-airlock";

/// The files of a test PKI: a CA, a server certificate for `localhost` signed by
/// it, and a second CA that signed nothing.
struct Pki {
    ca: PathBuf,
    wrong_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("cannot run `openssl`: install it (apt-get install openssl)")?;
    ensure!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn make_ca(dir: &Path, name: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=airlock test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
}

fn make_pki(dir: &Path) -> Result<Pki> {
    let dir = dir.join("pki");
    std::fs::create_dir_all(&dir)?;
    make_ca(&dir, "ca")?;
    make_ca(&dir, "wrong-ca")?;
    openssl(
        &dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    )?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\n\
         keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
    )?;
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    )?;
    let key = dir.join("server.key");
    // PostgreSQL refuses a key file others can read; as root the server runs as `postgres`.
    Command::new("chmod").arg("600").arg(&key).status()?;
    if Command::new("id")
        .arg("-u")
        .output()?
        .stdout
        .starts_with(b"0\n")
    {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&key)
            .arg(dir.join("server.crt"))
            .status()?;
    }
    Ok(Pki {
        ca: dir.join("ca.crt"),
        wrong_ca: dir.join("wrong-ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: key,
    })
}

/// The PostgreSQL the TLS tests start: the suite's, unless that build has no OpenSSL
/// (the PostgreSQL 18 wheel), then the system's, and the test says so. What is tested
/// is airlock's side of TLS, which a server that cannot serve it cannot show.
fn tls_bindir() -> PathBuf {
    use airlock::demo::cluster::{Build, find_bindir, system_bindir};
    let bin = find_bindir().unwrap_or_else(|e| panic!("{e}"));
    match Build::of(&bin) {
        Some(build) if !build.ssl => {
            let system = system_bindir().unwrap_or_else(|e| panic!("{e}"));
            assert!(
                Build::of(&system).is_some_and(|b| b.ssl),
                "neither {} nor {} was built with OpenSSL: the TLS tests need a PostgreSQL that can serve TLS (Debian's `postgresql`)",
                bin.display(),
                system.display()
            );
            eprintln!(
                "the PostgreSQL in {} was built without OpenSSL: this TLS test runs against {}",
                bin.display(),
                system.display()
            );
            system
        }
        _ => bin,
    }
}

/// A cluster with `ssl = on`. Role `app` (REPLICATION, password [`PASSWORD`]) may
/// connect only over TLS (`hostssl`, SCRAM); `postgres` connects plain, trusted.
async fn tls_cluster(pki: &Pki) -> Result<(Cluster, tokio_postgres::Client)> {
    tls_cluster_with(pki, "", "").await
}

/// [`tls_cluster`] with more settings, and pg_hba.conf lines before its own.
async fn tls_cluster_with(
    pki: &Pki,
    settings: &str,
    hba_first: &str,
) -> Result<(Cluster, tokio_postgres::Client)> {
    let pg = Cluster::start_from(
        tls_bindir(),
        &format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\npassword_encryption = 'scram-sha-256'\n{settings}",
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    )?;
    let db = pg.connect("postgres").await?;
    db.batch_execute(&format!(
        "CREATE ROLE app WITH LOGIN REPLICATION PASSWORD '{PASSWORD}';
         CREATE TABLE items (id integer PRIMARY KEY, name text);
         GRANT SELECT ON items TO app;
         CREATE PUBLICATION airlock FOR TABLE items;"
    ))
    .await?;
    let hba: String = db.query_one("SHOW hba_file", &[]).await?.get(0);
    std::fs::write(
        &hba,
        hba_first.to_owned()
            + "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host replication postgres 127.0.0.1/32 trust\n\
         hostssl all app 127.0.0.1/32 scram-sha-256\n\
         hostssl replication app 127.0.0.1/32 scram-sha-256\n",
    )?;
    db.batch_execute("SELECT pg_reload_conf()").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok((pg, db))
}

fn connect_config(
    port: u16,
    host: &str,
    user: &str,
    mode: SslMode,
    ca: Option<&Path>,
) -> ConnectConfig {
    let password = (user == "app").then_some(PASSWORD);
    let mut c = ConnectConfig::new(host, port, user, password, "postgres");
    c.sslmode = mode;
    c.sslrootcert = ca.map(Path::to_path_buf);
    c
}

/// Whether PostgreSQL sees backend `pid` on TLS.
async fn backend_ssl(db: &tokio_postgres::Client, pid: i32) -> Result<bool> {
    Ok(db
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = $1", &[&pid])
        .await?
        .get(0))
}

/// A replication connection with `c`, and whether the server sees it on TLS.
async fn replication_ssl(db: &tokio_postgres::Client, c: &ConnectConfig) -> Result<bool> {
    let conn = ReplicationConnection::connect(c)
        .await
        .with_context(|| format!("replication connection with sslmode={}", c.sslmode.as_str()))?;
    let pid = conn.backend_pid().context("no backend pid")?;
    let ssl = backend_ssl(db, pid).await?;
    conn.close().await?;
    Ok(ssl)
}

/// An SQL connection with `c`, and whether the server sees it on TLS.
async fn sql_ssl(c: &ConnectConfig) -> Result<bool> {
    let (client, connection) = c
        .connect_sql()
        .await
        .with_context(|| format!("SQL connection with sslmode={}", c.sslmode.as_str()))?;
    tokio::spawn(connection);
    Ok(client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0))
}

/// The error of a replication connection that must fail.
async fn replication_error(c: &ConnectConfig) -> SourceError {
    match ReplicationConnection::connect(c).await {
        Ok(_) => panic!("sslmode={} connected but must fail", c.sslmode.as_str()),
        Err(e) => e,
    }
}

async fn sql_error(c: &ConnectConfig) -> String {
    match c.connect_sql().await {
        Ok(_) => panic!("SQL sslmode={} connected but must fail", c.sslmode.as_str()),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_on_both_kinds_of_connection() -> Result<()> {
    let dir = temp_dir("tls-modes");
    let pki = make_pki(&dir)?;
    let (pg, db) = tls_cluster(&pki).await?;
    let port = pg.port;
    let ca = Some(pki.ca.as_path());

    // disable: plain, where pg_hba allows it (postgres, trusted).
    let plain = connect_config(port, "127.0.0.1", "postgres", SslMode::Disable, None);
    assert!(
        !replication_ssl(&db, &plain).await?,
        "sslmode=disable must be plain"
    );
    assert!(!sql_ssl(&plain).await?, "sslmode=disable must be plain");

    // Every encrypting mode, as app (hostssl, SCRAM over TLS): password auth works.
    for (mode, host, ca) in [
        (SslMode::Prefer, "127.0.0.1", None),
        (SslMode::Require, "127.0.0.1", None),
        (SslMode::VerifyCa, "127.0.0.1", ca),
        (SslMode::VerifyFull, "localhost", ca),
    ] {
        let c = connect_config(port, host, "app", mode, ca);
        assert!(replication_ssl(&db, &c).await?, "{mode:?} must encrypt");
        assert!(sql_ssl(&c).await?, "{mode:?} must encrypt (SQL)");
    }

    // verify-ca with a CA that did not sign the server's certificate.
    let wrong = connect_config(
        port,
        "127.0.0.1",
        "app",
        SslMode::VerifyCa,
        Some(&pki.wrong_ca),
    );
    let err = replication_error(&wrong).await;
    let text = err.to_string();
    assert!(matches!(err, SourceError::Tls { .. }), "{text}");
    assert!(
        !err.is_transient(),
        "a certificate refusal is definite: {text}"
    );
    assert!(
        text.contains(&format!(
            "the server certificate is not signed by a CA in sslrootcert `{}`",
            pki.wrong_ca.display()
        )),
        "{text}"
    );
    let text = sql_error(&wrong).await;
    assert!(text.contains("not signed by a CA in sslrootcert"), "{text}");

    // verify-full to a host name the certificate does not name (it names localhost).
    let wrong_host = connect_config(port, "127.0.0.1", "app", SslMode::VerifyFull, ca);
    let err = replication_error(&wrong_host).await;
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(
        text.contains("the server certificate is not valid for host `127.0.0.1`")
            && text.contains("localhost"),
        "{text}"
    );
    let text = sql_error(&wrong_host).await;
    assert!(text.contains("not valid for host `127.0.0.1`"), "{text}");

    // hostssl only: app in plain text is refused, and told why.
    let refused = connect_config(port, "127.0.0.1", "app", SslMode::Disable, None);
    let err = replication_error(&refused).await;
    let text = err.to_string();
    assert!(matches!(err, SourceError::Auth { .. }), "{text}");
    assert!(
        text.contains("no encryption")
            && text.contains("sslmode=disable")
            && text.contains("hostssl"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");

    // A wrong password over TLS: an authentication error without either password.
    let mut bad = connect_config(port, "localhost", "app", SslMode::VerifyFull, ca);
    bad.password = Some("not-the-Tr0ub4dor".into());
    let err = replication_error(&bad).await;
    let text = err.to_string();
    assert!(matches!(err, SourceError::Auth { .. }), "{text}");
    assert!(
        text.contains("password authentication failed for user \"app\""),
        "{text}"
    );
    assert!(
        !text.contains(PASSWORD) && !text.contains("not-the-Tr0ub4dor"),
        "{text}"
    );
    let text = sql_error(&bad).await;
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("not-the-Tr0ub4dor"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_tls_is_plain_for_prefer_and_an_error_for_require() -> Result<()> {
    let pg = cluster();
    let prefer = connect_config(pg.port, "127.0.0.1", "postgres", SslMode::Prefer, None);
    let db = pg.connect("postgres").await?;
    assert!(!replication_ssl(&db, &prefer).await?);
    assert!(!sql_ssl(&prefer).await?);

    let require = connect_config(pg.port, "127.0.0.1", "postgres", SslMode::Require, None);
    let err = replication_error(&require).await;
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(
        text.contains(
            "the server does not accept TLS connections, and sslmode=require requires TLS"
        ) && text.contains("turn on `ssl`"),
        "{text}"
    );
    let text = sql_error(&require).await;
    assert!(text.contains("server does not support TLS"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_snapshots_and_streams_over_tls_and_never_shows_the_password() -> Result<()> {
    let dir = temp_dir("tls-host");
    let pki = make_pki(&dir)?;
    let (pg, db) = tls_cluster(&pki).await?;
    db.batch_execute("INSERT INTO items SELECT g, 'before ' || g FROM generate_series(1, 50) g")
        .await?;
    let admin = format!("127.0.0.1:{}", airlock::demo::cluster::free_port());
    let config = support::config(
        &format!("postgres://app@127.0.0.1:{}/postgres", pg.port),
        &dir,
        "tls",
        "password_env = \"AIRLOCK_TEST_PG_PASSWORD\"\nsslmode = \"require\"\nsnapshot = \"initial\"\n",
    )
    .replace("127.0.0.1:0", &admin);
    let config_path = dir.join("airlock.toml");
    std::fs::write(&config_path, &config)?;
    let log_path = dir.join("host.log");

    // `airlock check` over TLS says so.
    let check = Command::new(airlock_bin())
        .args(["check", "--config"])
        .arg(&config_path)
        .env("AIRLOCK_TEST_PG_PASSWORD", PASSWORD)
        .output()?;
    let check_out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check_out.contains("(TLS TLSv1.3, sslmode=require)"),
        "{check_out}"
    );
    assert!(!check_out.contains(PASSWORD), "{check_out}");

    let mut host = HostProcess(
        Command::new(airlock_bin())
            .args(["run", "--config"])
            .arg(&config_path)
            .env("AIRLOCK_TEST_PG_PASSWORD", PASSWORD)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()?,
    );
    let table = dir.join("lake/public.items");
    let result = async {
        wait_for_lake(&table, Duration::from_secs(90), |rows| rows.len() >= 50).await?;
        db.batch_execute("INSERT INTO items SELECT g, 'after ' || g FROM generate_series(51, 80) g")
            .await?;
        let rows = wait_for_lake(&table, Duration::from_secs(60), |rows| rows.len() >= 80).await?;
        // Rows of one snapshot chunk share their LSNs: their order among themselves is free.
        let mut ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
        ids[..50].sort_unstable();
        assert_eq!(ids, (1..=80).collect::<Vec<_>>(), "every row once");
        assert!(rows[..50].iter().all(|r| r["_op"] == "r"), "snapshot rows first");
        assert!(rows[50..].iter().all(|r| r["_op"] == "c"), "then streamed inserts");

        // The server sees the walsender, and every other connection of app, on TLS.
        let walsender: Vec<bool> = db
            .query(
                "SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE backend_type = 'walsender' AND usename = 'app'",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(walsender, vec![true], "one walsender, on TLS");
        let plain: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'app' AND NOT ssl",
                &[],
            )
            .await?
            .get(0);
        assert_eq!(plain, 0, "no connection of app in plain text");

        let status = admin_status(&admin).await.context("no /status")?.to_string();
        assert!(status.contains("sslmode=require"), "{status}");
        assert!(status.contains("postgres://app:***@127.0.0.1"), "{status}");
        assert!(!status.contains(PASSWORD), "{status}");
        anyhow::Ok(())
    }
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    result.with_context(|| format!("host log:\n{log}"))?;
    host.stop(Duration::from_secs(30))?;
    let log = std::fs::read_to_string(&log_path)?;
    assert!(log.contains("tls established"), "{log}");
    assert!(log.contains("connected to postgresql"), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the password is in the host's log:\n{log}"
    );

    // A wrong password: the host stops with an authentication error, no password in it.
    let output = Command::new(airlock_bin())
        .args(["run", "--config"])
        .arg(&config_path)
        .env("AIRLOCK_TEST_PG_PASSWORD", "wrong-Tr0ub4dor")
        .env("RUST_LOG", "debug")
        .output()?;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{out}");
    assert!(out.contains("authentication as user `app`"), "{out}");
    assert!(out.contains("password authentication failed"), "{out}");
    assert!(
        !out.contains("wrong-Tr0ub4dor") && !out.contains(PASSWORD),
        "{out}"
    );
    Ok(())
}

/// `c` with `require_auth` and `channel_binding` set as libpq spells them.
fn with_auth(mut c: ConnectConfig, require_auth: &str, channel_binding: &str) -> ConnectConfig {
    c.auth.require_auth = require_auth.parse().expect("require_auth");
    c.auth.channel_binding = channel_binding.parse().expect("channel_binding");
    c
}

/// Whether both kinds of connection with `c` connect; the errors otherwise.
async fn both_connect(db: &tokio_postgres::Client, c: &ConnectConfig) -> Result<(), String> {
    let replication = match ReplicationConnection::connect(c).await {
        Ok(conn) => {
            let _ = conn.close().await;
            Ok(())
        }
        Err(e) => Err(format!("replication: {e}")),
    };
    let sql = match c.connect_sql().await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(format!("sql: {e}")),
    };
    let _ = db;
    match (replication, sql) {
        (Ok(()), Ok(())) => Ok(()),
        (r, s) => Err(format!("{:?} / {:?}", r.err(), s.err())),
    }
}

/// Both kinds of connection with `c` must be refused by airlock itself (an
/// authentication error naming `needle`), not by the server.
async fn both_refused(c: &ConnectConfig, needle: &str) {
    let err = replication_error(c).await;
    let text = err.to_string();
    assert!(
        matches!(err, SourceError::Auth { .. }),
        "replication: {text}"
    );
    assert!(!err.is_transient(), "replication: {text}");
    assert!(text.contains(needle), "replication: {text}");
    assert!(!text.contains(PASSWORD), "{text}");
    let text = sql_error(c).await;
    assert!(text.contains(needle), "sql: {text}");
    assert!(!text.contains(PASSWORD), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_auth_refuses_a_server_that_downgrades_the_method() -> Result<()> {
    let dir = temp_dir("tls-require-auth");
    let pki = make_pki(&dir)?;
    // `clear` authenticates with a cleartext password: what a server (or anyone in
    // the middle of an unverified connection) asks for to learn the password.
    let (pg, db) = tls_cluster_with(
        &pki,
        "",
        "hostssl all clear 127.0.0.1/32 password\nhostssl replication clear 127.0.0.1/32 password\n",
    )
    .await?;
    db.batch_execute(&format!(
        "CREATE ROLE clear WITH LOGIN REPLICATION PASSWORD '{PASSWORD}'"
    ))
    .await?;
    let port = pg.port;
    let ca = Some(pki.ca.as_path());
    let mut clear = connect_config(port, "localhost", "app", SslMode::VerifyFull, ca);
    clear.user = "clear".into();

    // Without require_auth the password goes out in clear (inside TLS, to whoever
    // answers); the control that the server really asks for it.
    both_connect(&db, &clear)
        .await
        .map_err(anyhow::Error::msg)?;
    // With require_auth=scram-sha-256 airlock refuses before it sends anything.
    let scram_only = with_auth(clear.clone(), "scram-sha-256", "prefer");
    both_refused(&scram_only, "require_auth=scram-sha-256").await;
    both_refused(&scram_only, "cleartext password").await;
    let no_cleartext = with_auth(clear.clone(), "!password", "prefer");
    both_refused(&no_cleartext, "cleartext password").await;

    // trust (postgres): accepted without a password unless require_auth says no.
    let trusted = connect_config(port, "127.0.0.1", "postgres", SslMode::Require, None);
    both_connect(&db, &trusted)
        .await
        .map_err(anyhow::Error::msg)?;
    both_refused(&with_auth(trusted, "scram-sha-256", "prefer"), "trust").await;

    // SCRAM with channel binding over verify-full: both stacks bind, and
    // channel_binding=require is satisfied (it refuses anything but -PLUS).
    let app = connect_config(port, "localhost", "app", SslMode::VerifyFull, ca);
    both_connect(&db, &with_auth(app, "scram-sha-256", "require"))
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

/// A relay that terminates TLS with its own certificate and talks to PostgreSQL in
/// plain text: the man in the middle that `sslmode=require` does not notice.
async fn tls_terminating_relay(pki_dir: &Path, upstream: u16) -> Result<u16> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    make_ca(pki_dir, "relay")?;
    let certs = vec![CertificateDer::from_pem_file(pki_dir.join("relay.crt"))?];
    let key = PrivateKeyDer::from_pem_file(pki_dir.join("relay.key"))?;
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                client.read_exact(&mut request).await?;
                client.write_all(b"S").await?;
                let mut client = acceptor.accept(client).await?;
                let mut server = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await?;
                tokio::io::copy_bidirectional(&mut client, &mut server).await?;
                anyhow::Ok(())
            });
        }
    });
    Ok(port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_stops_a_relay_that_terminates_tls() -> Result<()> {
    let dir = temp_dir("tls-relay");
    let pki = make_pki(&dir)?;
    // `relayed` may connect in plain text with SCRAM, as the relay does.
    let (pg, db) = tls_cluster_with(
        &pki,
        "",
        "host all relayed 127.0.0.1/32 scram-sha-256\nhost replication relayed 127.0.0.1/32 scram-sha-256\n",
    )
    .await?;
    db.batch_execute(&format!(
        "CREATE ROLE relayed WITH LOGIN REPLICATION PASSWORD '{PASSWORD}'"
    ))
    .await?;
    let relay = tls_terminating_relay(&dir.join("pki"), pg.port).await?;
    let mut through_relay = connect_config(relay, "127.0.0.1", "app", SslMode::Require, None);
    through_relay.user = "relayed".into();

    // channel_binding=prefer: the relay gets through and reads everything.
    both_connect(
        &db,
        &with_auth(through_relay.clone(), "scram-sha-256", "prefer"),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    // channel_binding=require: the relay cannot offer SCRAM-SHA-256-PLUS upstream of
    // its own TLS, and airlock refuses.
    both_refused(
        &with_auth(through_relay, "scram-sha-256", "require"),
        "channel_binding=require",
    )
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_both_kinds_of_connection() -> Result<()> {
    let dir = temp_dir("tls-client-cert");
    let pki = make_pki(&dir)?;
    let pki_dir = dir.join("pki");
    openssl(
        &pki_dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=certuser",
        ],
    )?;
    std::fs::write(
        pki_dir.join("client.ext"),
        "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\n",
    )?;
    openssl(
        &pki_dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.crt",
            "-days",
            "2",
            "-extfile",
            "client.ext",
        ],
    )?;
    let ca_for_server = pki_dir.join("server-ca.crt");
    std::fs::copy(&pki.ca, &ca_for_server)?;
    let (pg, db) = tls_cluster_with(
        &pki,
        &format!("ssl_ca_file = '{}'\n", ca_for_server.display()),
        "hostssl all certuser 127.0.0.1/32 cert\nhostssl replication certuser 127.0.0.1/32 cert\n",
    )
    .await?;
    db.batch_execute("CREATE ROLE certuser WITH LOGIN REPLICATION")
        .await?;
    let key = pki_dir.join("client.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mut c = ConnectConfig::new("localhost", pg.port, "certuser", None, "postgres");
    c.sslmode = SslMode::VerifyFull;
    c.sslrootcert = Some(pki.ca.clone());

    // Without the certificate the server refuses.
    let text = sql_error(&c).await;
    assert!(text.contains("certificate"), "{text}");

    c.sslcert = Some(pki_dir.join("client.crt"));
    c.sslkey = Some(key.clone());
    both_connect(&db, &c).await.map_err(anyhow::Error::msg)?;
    // And it is the certificate that did it: no password, require_auth=none holds.
    both_connect(&db, &with_auth(c.clone(), "none", "prefer"))
        .await
        .map_err(anyhow::Error::msg)?;

    // A key file others can read is refused, as libpq does.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let err = replication_error(&c).await.to_string();
    assert!(
        err.contains("group or world access") && err.contains("chmod 600"),
        "{err}"
    );
    Ok(())
}
