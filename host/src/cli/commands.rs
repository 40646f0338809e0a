//! The commands other than `run` and `demo`: each takes its arguments and prints
//! what it found.

use std::path::PathBuf;

use anyhow::Context;
use tokio::sync::watch;

use super::admin_client::{AdminArgs, AdminError, send};

pub async fn guest_test(plugin: PathBuf, settings: Vec<String>) -> anyhow::Result<()> {
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
        let stdout = std::io::stdout().lock();
        crate::pipeline::harness::run(&mut pipeline, stdin, stdout)?;
        Ok(())
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
