//! `airlock demo`: the embedded default. A throwaway PostgreSQL cluster with a sample
//! `customers` table, the example guests in a plugin folder, a local Delta lake, and
//! live inserts, updates and deletes until Ctrl-C or `--duration`.

pub mod cluster;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;

pub use cluster::Cluster;

/// What `airlock demo` was asked for.
#[derive(Debug, Default)]
pub struct DemoOptions {
    pub duration: Option<Duration>,
    pub dir: Option<PathBuf>,
    pub guests: Option<PathBuf>,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(
        "the example guests are not built (looked in {looked}): run `cargo xtask guests`, \
         or pass --guests DIR with mask.wasm in it"
    )]
    NoGuests { looked: String },
    #[error("sample database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("demo directory: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Run(#[from] crate::RunError),
}

/// The example stages, in order, with their demo settings.
const STAGES: &[(&str, &str, &str)] = &[
    (
        "filter",
        "10-filter",
        "# keep every table; drop nothing by default\n",
    ),
    (
        "tag",
        "20-tag",
        "# classify columns that look like personal data\n",
    ),
    (
        "route",
        "40-route",
        "spine_tables = [\"public.customers\"]\n",
    ),
];

/// The demo's policy: every column of `customers` classified, e-mail and name
/// tokenised with the demo key at the gate, the phone number cut to its last digits,
/// the sign-up time to its day; any column added later is denied until classified.
const DEMO_POLICY: &str = r#"[policy]
default = "deny"
key_file = "policy.key"
key_id = "demo1"

[policy.classes]
public = { action = "keep" }
pii = { action = "hmac", normalize = ["trim", "lower"] }
contact = { action = "keep-last", n = 4 }
coarse-time = { action = "generalize", unit = "day" }

[policy.columns]
"public.customers.id" = "public"
"public.customers.name" = "pii"
"public.customers.email" = "pii"
"public.customers.phone" = "contact"
"public.customers.balance" = "public"
"public.customers.active" = "public"
"public.customers.visits" = "public"
"public.customers.tier" = "public"
"public.customers.score" = "public"
"public.customers.signed_up" = "coarse-time"
"#;

/// Writes 32 random bytes, hex, to a new `0600` file.
fn write_demo_key(path: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut bytes = [0u8; 32];
    crate::secrets::random_bytes(&mut bytes)?;
    let mut file = crate::private_files::create(path)?;
    file.write_all(hex::encode(bytes).as_bytes())?;
    Ok(())
}

/// Where the built example guests are: `--guests`, `$AIRLOCK_GUESTS`, or `guests/dist`
/// in the current directory or the source tree.
fn find_guests(explicit: Option<&Path>) -> Result<PathBuf, DemoError> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => std::env::var_os("AIRLOCK_GUESTS")
            .map(PathBuf::from)
            .into_iter()
            .chain([
                PathBuf::from("guests/dist"),
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/dist"),
            ])
            .collect(),
    };
    candidates
        .iter()
        .find(|dir| dir.join("mask.wasm").is_file())
        .cloned()
        .ok_or_else(|| DemoError::NoGuests {
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

const SCHEMA: &str = "
CREATE TABLE customers (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL,
    phone       text,
    balance     numeric(12,2) NOT NULL DEFAULT 0,
    active      boolean NOT NULL DEFAULT true,
    visits      integer NOT NULL DEFAULT 0,
    tier        smallint,
    score       double precision,
    signed_up   timestamptz NOT NULL DEFAULT now()
);
CREATE PUBLICATION airlock FOR TABLE customers;
";

/// Created before the host starts, so no change of the traffic predates the slot.
const SLOT: &str = "SELECT pg_create_logical_replication_slot('airlock', 'pgoutput')";

const FIRST: &[&str] = &[
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Niklaus",
];
const LAST: &[&str] = &[
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman",
    "Wirth",
];

/// A small deterministic generator for the traffic.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Inserts, updates and deletes customers until `stop` turns true.
async fn traffic(
    client: tokio_postgres::Client,
    mut stop: watch::Receiver<bool>,
) -> Result<u64, tokio_postgres::Error> {
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    let mut changes = 0u64;
    let insert = client
        .prepare(
            "INSERT INTO customers (name, email, phone, balance, visits, tier, score) \
             VALUES ($1, $2, $3, $4::text::numeric, $5, $6, $7)",
        )
        .await?;
    let mut next_id = 0u64;
    loop {
        for _ in 0..3 {
            next_id += 1;
            let first = FIRST[rng.below(FIRST.len() as u64) as usize];
            let last = LAST[rng.below(LAST.len() as u64) as usize];
            let name = format!("{first} {last}");
            let email = format!(
                "{}.{}{}@example.com",
                first.to_lowercase(),
                last.to_lowercase(),
                next_id
            );
            let phone = format!("+1-555-{:03}-{:04}", rng.below(1000), rng.below(10_000));
            let balance = format!("{}.{:02}", rng.below(100_000), rng.below(100));
            client
                .execute(
                    &insert,
                    &[
                        &name,
                        &email,
                        &phone,
                        &balance,
                        &(rng.below(50) as i32),
                        &(rng.below(3) as i16 + 1),
                        &(rng.below(1000) as f64 / 7.0),
                    ],
                )
                .await?;
            changes += 1;
        }
        changes += client
            .execute(
                "UPDATE customers SET visits = visits + 1, balance = balance + 1.25 \
                 WHERE id = (SELECT id FROM customers ORDER BY random() LIMIT 1)",
                &[],
            )
            .await?;
        if rng.below(4) == 0 {
            changes += client
                .execute(
                    "DELETE FROM customers WHERE id = (SELECT min(id) FROM customers WHERE active)",
                    &[],
                )
                .await?;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return Ok(changes),
        }
        if *stop.borrow() {
            return Ok(changes);
        }
    }
}

/// Runs the demo until `shutdown` or the duration ends.
pub async fn run(
    options: DemoOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), DemoError> {
    let guests = find_guests(options.guests.as_deref())?;
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("airlock-demo"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let plugins = dir.join("plugins");
    let lake = dir.join("lake");
    std::fs::create_dir_all(&plugins)?;
    std::fs::create_dir_all(&lake)?;
    let mut stages = Vec::new();
    for (guest, stage, settings) in STAGES {
        let wasm = guests.join(format!("{guest}.wasm"));
        if wasm.is_file() {
            std::fs::copy(&wasm, plugins.join(format!("{stage}.wasm")))?;
            std::fs::write(plugins.join(format!("{stage}.toml")), settings)?;
            stages.push(*stage);
        }
    }

    println!("starting a throwaway PostgreSQL cluster ...");
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(""))
        .await
        .map_err(std::io::Error::other)??;
    let client = cluster.connect("postgres").await?;
    client.batch_execute(SCHEMA).await?;
    client.batch_execute(SLOT).await?;

    // The built-in audit spine, in this process.
    let spine_dir = dir.join("spine");
    let spine_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let spine_addr = spine_listener.local_addr()?;
    let (spine_stop_tx, mut spine_stop) = watch::channel(false);
    let spine_dir_for_task = spine_dir.clone();
    let spine = tokio::spawn(async move {
        crate::spine::server::serve(&spine_dir_for_task, spine_listener, None, async move {
            let _ = spine_stop.wait_for(|s| *s).await;
        })
        .await
    });

    // The demo's own key for `hmac`: random, private, thrown away with the demo.
    write_demo_key(&dir.join("policy.key"))?;
    let config_path = dir.join("airlock.toml");
    let config_text = format!(
        "# written by `airlock demo`\n[source]\nurl = \"{url}\"\npublication = \"airlock\"\nslot = \"airlock\"\nstatus_interval = \"1s\"\n\n\
         [plugins]\ndir = \"plugins\"\nrequire = [\"40-route\"]\n\n\
         [sinks.lake]\ntype = \"delta\"\nurl = \"file://{lake}\"\nroutes = [\"default\", \"restricted\"]\nflush_interval = \"2s\"\n\n\
         [sinks.spine]\ntype = \"http\"\nurl = \"http://{spine_addr}/events\"\nroutes = [\"spine\"]\nkey_file = \"spine.key\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n{policy}",
        policy = DEMO_POLICY,
        url = cluster.url("postgres"),
        lake = lake.display(),
        admin = cluster::free_port(),
    );
    std::fs::write(&config_path, &config_text)?;
    let config = crate::config::Config::load(&config_path)?;

    let table = lake.join("public.customers");
    println!(
        "\nairlock demo\n  postgres:  {url}\n  config:    {config}\n  plugins:   {stages}\n  lake:      {table}\n  spine:     http://{spine_addr}/events (log in {spine_dir})\n  admin:     airlock status --config {config}\n\n\
         read the lake while it runs (DuckDB with the delta extension):\n  \
         duckdb -c \"SELECT id, name, email, phone, balance, _op, _commit_lsn FROM delta_scan('{table}') ORDER BY _commit_lsn, _lsn\"\n\
         or with Python:\n  python3 -c \"import deltalake; print(deltalake.DeltaTable('{table}').to_pandas())\"\n\
         the audit events (masked), and the hash chain's check:\n  curl -s 'http://{spine_addr}/events?limit=5'\n  curl -s http://{spine_addr}/verify\n\n\
         {until}\n",
        url = cluster.url("postgres"),
        table = table.display(),
        spine_dir = spine_dir.display(),
        config = config_path.display(),
        stages = stages.join(", "),
        until = match options.duration {
            Some(d) => format!("running for {d:?} ..."),
            None => "running until Ctrl-C ...".into(),
        },
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut pipeline = tokio::spawn(crate::run(config, stop_rx.clone()));
    let traffic_client = cluster.connect("postgres").await?;
    let load = tokio::spawn(traffic(traffic_client, stop_rx));

    let until = async {
        match options.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    // Stop on Ctrl-C, at the end of --duration, or as soon as the pipeline fails.
    let early = tokio::select! {
        _ = until => None,
        _ = shutdown.changed() => None,
        result = &mut pipeline => Some(result),
    };
    let _ = stop_tx.send(true);
    let changes = load.await.map_err(std::io::Error::other)??;
    let result = match early {
        Some(result) => result,
        None => pipeline.await,
    }
    .map_err(std::io::Error::other)?;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await?
        .get(0);
    drop(client);
    let _ = spine_stop_tx.send(true);
    let _ = spine.await;
    result?;
    let verified = crate::spine::server::verify(&spine_dir)
        .map(|r| format!("{} events, chain valid: {}", r.checked, r.valid));
    println!(
        "\nstopped: {changes} changes made, {rows} customers in PostgreSQL.\nthe lake stays at {table}\nthe spine log stays at {spine} ({verified})\n\
         (verify it again with: airlock spine verify --dir {spine})\n(the PostgreSQL cluster was removed)",
        table = table.display(),
        spine = spine_dir.display(),
        verified = verified.unwrap_or_else(|e| e.to_string()),
    );
    drop(cluster);
    Ok(())
}
