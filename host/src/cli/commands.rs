//! The commands other than `run` and `demo`: each takes its arguments and prints
//! what it found.

use std::path::PathBuf;

use anyhow::Context;
use tokio::sync::watch;

use super::admin_client::{AdminArgs, AdminError, send};

/// `airlock snapshot`: asks the airlock streaming from the configured slot to copy
/// `tables` again, through a logical message in its stream; then follows the state
/// file until each copy is durable (unless `no_wait`).
pub async fn snapshot(config: PathBuf, tables: Vec<String>, no_wait: bool) -> anyhow::Result<()> {
    use crate::source::incremental::{REQUEST_PREFIX, Request, Tables};
    let config = crate::config::Config::load(&config)?;
    anyhow::ensure!(
        config.source.snapshot == crate::config::Snapshot::Initial,
        "incremental snapshots are off: set [source] snapshot = \"initial\" (the lake then holds every published row, and tables added or rewritten later are copied too)"
    );
    let connect = config.source.connect_config()?;
    let target = connect.redacted_url();
    let (client, connection) = connect.connect_sql().await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let publication = &config.source.publication;
    let published: Vec<(String, String, u32, i64)> = client
        .query(
            "SELECT p.schemaname::text, p.tablename::text, c.oid, greatest(c.reltuples, 0)::int8 \
             FROM pg_publication_tables p JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 ORDER BY 1, 2",
            &[publication],
        )
        .await
        .with_context(|| format!("{target}: listing the tables of publication `{publication}`"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let mut chosen = Vec::new();
    for table in &tables {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let Some(found) = published
            .iter()
            .find(|(s, n, _, _)| s == schema && n == name)
        else {
            let names: Vec<String> = published
                .iter()
                .map(|(s, n, _, _)| format!("{s}.{n}"))
                .collect();
            anyhow::bail!(
                "`{table}` is not published by `{publication}` (it publishes {}): ALTER PUBLICATION {publication} ADD TABLE {schema}.{name}, and airlock copies it by itself",
                if names.is_empty() {
                    "no table".to_owned()
                } else {
                    names.join(", ")
                }
            );
        };
        chosen.push(found.clone());
    }
    let system_id: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .with_context(|| format!("{target}: reading the system identifier"))?
        .get(0);
    let mut random = [0u8; 8];
    crate::secrets::random_bytes(&mut random)?;
    let request = Request {
        slot: config.source.slot.clone(),
        tables: chosen.iter().map(|(_, _, oid, _)| *oid).collect(),
        id: hex::encode(random),
    };
    let lsn: String = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)::text",
            &[&REQUEST_PREFIX, &serde_json::to_string(&request)?],
        )
        .await
        .with_context(|| {
            format!("{target}: writing the request (needs EXECUTE on pg_logical_emit_message)")
        })?
        .get(0);
    let names: Vec<String> = chosen
        .iter()
        .map(|(s, n, _, _)| format!("{s}.{n}"))
        .collect();
    eprintln!(
        "requested a copy of {} at {lsn} (request {}); the airlock streaming from slot `{}` takes it in stream order",
        names.join(", "),
        request.id,
        config.source.slot
    );
    if no_wait {
        return Ok(());
    }
    let path = Tables::path(&config.source.state_dir, &system_id, &config.source.slot);
    let reason = request.reason();
    let estimate: i64 = chosen.iter().map(|(_, _, _, rows)| rows).sum();
    crate::progress::enable_bars();
    let mut progress = crate::progress::Progress::start(
        "snapshot",
        crate::progress::Unit::Rows,
        estimate.max(0) as u64,
    );
    progress.set_message(format!("waiting for airlock ({})", path.display()));
    loop {
        let state = Tables::load(&path)?;
        let entries: Vec<Option<&crate::source::incremental::TableState>> = request
            .tables
            .iter()
            .map(|oid| state.as_ref().and_then(|s| s.tables.get(oid)))
            .collect();
        let rows: u64 = entries
            .iter()
            .flatten()
            .filter(|t| {
                [&t.due, &t.copied]
                    .iter()
                    .any(|r| r.as_deref().is_some_and(|r| r.contains(&reason)))
            })
            .filter_map(|t| t.rows)
            .sum();
        progress.set_done(rows);
        let done = entries
            .iter()
            .filter(|t| t.is_some_and(|t| t.copied.as_deref().is_some_and(|c| c.contains(&reason))))
            .count();
        if done == entries.len() {
            progress.finish();
            eprintln!(
                "copied {} ({rows} rows), durable in every sink",
                names.join(", ")
            );
            return Ok(());
        }
        progress.set_message(format!("{done}/{} tables copied", entries.len()));
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

pub async fn guest_test(
    plugin: PathBuf,
    settings: Vec<String>,
    expect: Option<PathBuf>,
) -> anyhow::Result<()> {
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
        let limits = crate::pipeline::runtime::Limits {
            names: std::sync::Arc::new(crate::pipeline::names::Names::unchecked()),
            ..Default::default()
        };
        let runtime =
            crate::pipeline::runtime::Runtime::new(limits, crate::config::default_cache_dir())?;
        let files = if plugin.is_dir() {
            crate::pipeline::scan(&plugin)?
        } else {
            let name = plugin
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let toml = plugin.with_extension("toml");
            vec![crate::pipeline::PluginFile {
                name,
                settings: toml.is_file().then_some(toml),
                wasm: plugin.clone(),
            }]
        };
        let mut pipeline =
            crate::pipeline::Pipeline::load(&runtime, &files, &extra).map_err(|errors| {
                anyhow::anyhow!(
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })?;
        let stdin = std::io::stdin().lock();
        let Some(expected) = expect else {
            let stdout = std::io::stdout().lock();
            crate::pipeline::harness::run(&mut pipeline, stdin, stdout)?;
            return Ok(());
        };
        let wanted = std::fs::read_to_string(&expected)
            .with_context(|| format!("cannot read {}", expected.display()))?;
        let mut output = Vec::new();
        let rows = crate::pipeline::harness::run(&mut pipeline, stdin, &mut output)?;
        let output = String::from_utf8_lossy(&output);
        match super::scaffold::first_difference(&wanted, &output) {
            None => {
                eprintln!("ok: {rows} rows as {} expects", expected.display());
                Ok(())
            }
            Some(difference) => anyhow::bail!(
                "the output differs from {}: {difference}\n(if the new output is right, keep it: \
                 run the same command without --expect and write its output to that file)",
                expected.display()
            ),
        }
    })
    .await?
}

pub async fn check(path: PathBuf) -> anyhow::Result<()> {
    let config = match crate::config::Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            print!("{e}");
            anyhow::bail!("{} is not valid: fix the problems above", path.display());
        }
    };
    let findings = crate::check::check(&config).await;
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

/// Runs SQL that installs or removes airlock's helpers in the configuration's database
/// (`airlock policy …`, `airlock identity …`), or prints it with `--print`. `sql` is
/// given the configuration when there is one; `command` names the command in hints.
pub async fn apply_sql(
    config: Option<PathBuf>,
    print: bool,
    command: &str,
    done: &str,
    sql: impl FnOnce(Option<&crate::config::Config>) -> String,
) -> anyhow::Result<()> {
    let loaded = config
        .as_deref()
        .map(crate::config::Config::load)
        .transpose()?;
    let sql = sql(loaded.as_ref());
    if print {
        print!("{sql}");
        return Ok(());
    }
    let Some(config) = loaded else {
        anyhow::bail!(
            "give --config FILE to run it against that database, or --print to see the SQL"
        );
    };
    let connect = config.source.connect_config()?;
    let target = connect.redacted_url();
    let (client, connection) = connect.connect_sql().await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.batch_execute(&sql).await.map_err(|e| {
        let text = e.to_string();
        let source = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default();
        let denied = [&text, &source].iter().any(|t| {
            t.contains("permission denied")
                || t.contains("must be superuser")
                || t.contains("must be owner")
        });
        anyhow::anyhow!(
            "{target}: {text}{}{}",
            if source.is_empty() {
                String::new()
            } else {
                format!(": {source}")
            },
            if denied {
                format!(
                    " (this needs a superuser: run `airlock {command} --print` and apply it as one)"
                )
            } else {
                String::new()
            }
        )
    })?;
    println!("{done} in {target}");
    Ok(())
}

/// `airlock status`: the report, rendered (or its JSON).
pub async fn status(admin: AdminArgs, json: bool) -> anyhow::Result<()> {
    let (_, body) = send(&admin, reqwest::Method::GET, "/status").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        let report: crate::status::StatusReport = serde_json::from_value(body)
            .context("the admin API's /status is not a status report")?;
        print!("{}", report.render());
    }
    Ok(())
}

/// `airlock reload`.
pub async fn reload(admin: AdminArgs) -> anyhow::Result<()> {
    let (code, body) = send(&admin, reqwest::Method::POST, "/reload").await?;
    if code != 200 {
        anyhow::bail!(
            "reload refused: {}",
            body["error"].as_str().unwrap_or("unknown error")
        );
    }
    println!(
        "reloaded: pipeline {}",
        body["version"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// `airlock catalog`.
pub async fn catalog(config: PathBuf, json: bool) -> anyhow::Result<()> {
    let config = crate::config::Config::load(&config)?;
    let catalog = crate::sink::lake::catalog(config.lakes()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&catalog.to_json())?);
    } else {
        print!("{}", catalog.render_table());
    }
    Ok(())
}

/// `airlock compact`: through the running host, or directly when none answers.
pub async fn compact(config: PathBuf, token: Option<String>) -> anyhow::Result<()> {
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
        Err(AdminError::Unreachable { .. }) => {
            eprintln!(
                "no host answers at the admin address; compacting directly under the lake's lock"
            );
            let config = crate::config::Config::load(&config)?;
            let reports = crate::sink::lake::compact_offline(config.lakes()).await?;
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
        Err(error) => return Err(error.into()),
    }
    Ok(())
}

/// `airlock spine serve`.
pub async fn spine_serve(
    dir: PathBuf,
    listen: String,
    token: Option<String>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
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
    crate::spine::server::serve(&dir, listener, token, async move {
        let _ = stop.wait_for(|s| *s).await;
    })
    .await?;
    Ok(())
}

/// `airlock spine verify`.
pub fn spine_verify(dir: PathBuf) -> anyhow::Result<()> {
    let report = crate::spine::server::verify(&dir)?;
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
    Ok(())
}
