//! Support for the lake tests and `bench_lake`: a moto S3 server on 127.0.0.1 and a
//! reader of S3 Delta tables (the `deltalake` Python package).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;

/// The pip command that installs what these tests need.
pub const PIP_MOTO: &str = "python3 -m pip install 'moto[server]==5.2.1'";

/// moto's S3 API server on a free 127.0.0.1 port; stopped on drop.
pub struct Moto {
    pub port: u16,
    child: std::process::Child,
}

impl Moto {
    /// Starts the server; panics with the install command when moto is missing.
    pub fn start() -> Moto {
        let check = Command::new("python3")
            .args(["-c", "import moto.server, flask, flask_cors"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run python3 ({e}): install Python 3, then {PIP_MOTO}")
            });
        assert!(
            check.status.success(),
            "moto's S3 server is not installed ({}): {PIP_MOTO}",
            String::from_utf8_lossy(&check.stderr).trim()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto ({e}): {PIP_MOTO}"));
        let mut moto = Moto { port, child };
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return moto;
            }
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("moto's S3 server exited ({status}): {PIP_MOTO}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("moto's S3 server did not listen on 127.0.0.1:{port} within 30 s");
    }

    /// The server's process id (to freeze it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (path-style `PUT /bucket`).
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let response = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("creating bucket {bucket}: {}", response.status());
        }
        Ok(())
    }

    /// The object store options for a lake in this server: what `[sinks.NAME]
    /// storage_options` holds. deltalake 1.1.2 commits with S3 conditional put
    /// (`If-None-Match: *`), which moto honours: no locking provider is needed.
    pub fn storage_options(&self) -> BTreeMap<String, String> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// `storage_options` as a TOML inline table.
    pub fn storage_options_toml(&self) -> String {
        let pairs: Vec<String> = self
            .storage_options()
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect();
        format!("{{ {} }}", pairs.join(", "))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const READ_S3: &str = r#"
import datetime, decimal, json, sys, uuid
try:
    import deltalake
except ImportError as error:
    sys.exit(f"missing Python package ({error}): pip install deltalake")
def plain(v):
    if isinstance(v, decimal.Decimal): return str(v)
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)): return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)): return "\\x" + bytes(v).hex()
    if isinstance(v, uuid.UUID): return str(v)
    if isinstance(v, list): return [plain(x) for x in v]
    if isinstance(v, dict): return {k: plain(x) for k, x in v.items()}
    return v
try:
    import duckdb
except ImportError as error:
    sys.exit(f"missing Python package ({error}): pip install duckdb==1.5.5")
# deltalake reads the table from S3 (its own engine, no pyarrow needed); DuckDB only
# turns the Arrow result into Python values.
table = deltalake.DeltaTable(sys.argv[1], storage_options=json.loads(sys.argv[2]))
arrow = deltalake.QueryBuilder().register("t", table).execute("SELECT * FROM t").read_all()
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
cur = con.execute("SELECT * FROM arrow ORDER BY _commit_lsn, _lsn")
names = [d[0] for d in cur.description]
rows = [dict(zip(names, r)) for r in cur.fetchall()]
for row in rows:
    print(json.dumps({k: plain(v) for k, v in row.items()}, sort_keys=True))
"#;

/// Rows of the Delta table at `url` (`s3://...`), read by the `deltalake` Python
/// package (its query engine; DuckDB converts the Arrow result), in change order.
pub fn read_s3_table(url: &str, options: &BTreeMap<String, String>) -> Result<Vec<Json>> {
    let out = Command::new("python3")
        .args(["-c", READ_S3, url, &serde_json::to_string(options)?])
        .output()
        .context("cannot run python3")?;
    if !out.status.success() {
        bail!(
            "reading {url} with deltalake failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line from the reader: {l}")))
        .collect()
}
