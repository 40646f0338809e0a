//! What airlock reads from PostgreSQL's catalog, typed: the server's WAL level and
//! version, the role, a replication slot, a publication with its tables, column lists
//! and row filters, and a published table's shape as pgoutput describes it.
//!
//! The source (its checks at connect, the snapshot, column types), `airlock check`
//! and the slot health monitor ask here, over an ordinary SQL connection; no other
//! module writes SQL against the catalog.
//!
//! Invariants:
//! - Queries are read-only, except [`create_publication`], and bind every name as a
//!   parameter (or quote it with [`quote_ident`]).
//! - Each result says what PostgreSQL said: a missing slot or publication is `None`,
//!   never a default; LSNs are parsed, and one PostgreSQL sends that does not parse
//!   is an error naming it.
//! - What differs across versions (column lists and row filters from 15, published
//!   generated columns from 18, a standby's WAL position) is decided here, from
//!   `server_version_num` and `pg_is_in_recovery()`.

use tokio_postgres::Client;

use super::error::SourceError;
use super::protocol::quote_ident;
use crate::change::{Column, Lsn, Relation, ReplicaIdentity};
use crate::status::SlotStats;

/// The first server version (`server_version_num`) with column lists and row filters.
const PG15: i32 = 150_000;
/// The first server version that can publish generated columns.
const PG18: i32 = 180_000;

/// `wal_level`: logical decoding needs [`WalLevel::Logical`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalLevel {
    Minimal,
    Replica,
    Logical,
    /// A value this version of airlock does not know.
    Other(String),
}

impl WalLevel {
    fn parse(text: &str) -> WalLevel {
        match text {
            "minimal" => WalLevel::Minimal,
            "replica" | "archive" | "hot_standby" => WalLevel::Replica,
            "logical" => WalLevel::Logical,
            other => WalLevel::Other(other.to_owned()),
        }
    }

    /// The setting as PostgreSQL spells it.
    pub fn as_str(&self) -> &str {
        match self {
            WalLevel::Minimal => "minimal",
            WalLevel::Replica => "replica",
            WalLevel::Logical => "logical",
            WalLevel::Other(text) => text,
        }
    }
}

impl std::fmt::Display for WalLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The server's `wal_level`.
pub async fn wal_level(client: &Client) -> Result<WalLevel, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await?;
    Ok(WalLevel::parse(row.get(0)))
}

/// The server's `server_version_num` (for example 170004).
pub async fn server_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?;
    Ok(row.get(0))
}

/// The role airlock connects as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleInfo {
    pub name: String,
    /// `REPLICATION` or superuser: may stream from a slot.
    pub may_replicate: bool,
}

/// The current role and whether it may replicate.
pub async fn current_role(client: &Client) -> Result<RoleInfo, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles \
             WHERE rolname = current_user",
            &[],
        )
        .await?;
    Ok(RoleInfo {
        name: row.get(0),
        may_replicate: row.get(1),
    })
}

/// A replication slot, from `pg_replication_slots`, with the server's WAL position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// The output plugin; `None` for a physical slot.
    pub plugin: Option<String>,
    /// Whether a consumer streams from it now, and its backend's pid.
    pub active: bool,
    pub active_pid: Option<i32>,
    /// Acknowledged through here (logical slots).
    pub confirmed_flush: Option<Lsn>,
    /// The oldest WAL the slot still needs.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (the WAL it needs is gone).
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger of `lost`.
    pub safe_wal_size: Option<i64>,
    /// The server's WAL position now (on a standby, the last WAL replayed).
    pub current_wal: Option<Lsn>,
    /// Why PostgreSQL invalidated the slot (`wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`, `idle_timeout`); 17 and later say, `None` before.
    pub invalidation_reason: Option<String>,
    /// Whether the slot is synchronized to standbys for failover; `None` before 17.
    pub failover: Option<bool>,
}

impl SlotInfo {
    /// Whether the slot can no longer be streamed from: the WAL it needs is gone
    /// (`wal_status = lost`), or PostgreSQL 17+ invalidated it for another reason.
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }

    /// Why the slot is lost, in PostgreSQL's words.
    pub fn lost_reason(&self) -> String {
        match &self.invalidation_reason {
            Some(reason) => format!("PostgreSQL invalidated it: `{reason}`"),
            None => "wal_status is `lost`".into(),
        }
    }

    /// Whether it is a slot airlock can stream from (logical, pgoutput).
    pub fn is_pgoutput(&self) -> bool {
        self.plugin.as_deref() == Some("pgoutput")
    }

    /// Bytes of WAL written past what the slot acknowledged.
    pub fn lag_bytes(&self) -> Option<u64> {
        let (current, confirmed) = (self.current_wal?, self.confirmed_flush?);
        Some(current.0.saturating_sub(confirmed.0))
    }
}

/// Slot `name`, or `None` when there is none.
pub async fn slot(client: &Client, name: &str) -> Result<Option<SlotInfo>, CatalogError> {
    let row = client
        .query_opt(
            // Columns of later versions through to_jsonb: NULL where they are absent.
            "SELECT plugin::text, active, active_pid, confirmed_flush_lsn::text, \
             restart_lsn::text, wal_status, safe_wal_size, \
             (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
              ELSE pg_current_wal_lsn() END)::text, \
             to_jsonb(s) ->> 'invalidation_reason', (to_jsonb(s) ->> 'failover')::bool \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let lsn = |index: usize, what: &'static str| -> Result<Option<Lsn>, CatalogError> {
        row.get::<_, Option<String>>(index)
            .map(|text| {
                text.parse().map_err(|_| CatalogError::Unexpected {
                    what: format!("{what} of slot `{name}`"),
                    value: text,
                })
            })
            .transpose()
    };
    Ok(Some(SlotInfo {
        plugin: row.get(0),
        active: row.get(1),
        active_pid: row.get(2),
        confirmed_flush: lsn(3, "confirmed_flush_lsn")?,
        restart_lsn: lsn(4, "restart_lsn")?,
        wal_status: row.get(5),
        safe_wal_size: row.get(6),
        current_wal: lsn(7, "the current WAL position")?,
        invalidation_reason: row.get(8),
        failover: row.get(9),
    }))
}

/// The decoding statistics of slot `name`, or `None` when it has none (yet).
pub async fn slot_stats(client: &Client, name: &str) -> Result<Option<SlotStats>, CatalogError> {
    // to_jsonb: every version's columns, whatever it adds.
    let row = client
        .query_opt(
            "SELECT to_jsonb(s)::text FROM pg_stat_replication_slots s WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let text: String = row.get(0);
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|_| CatalogError::Unexpected {
            what: format!("pg_stat_replication_slots of slot `{name}`"),
            value: text,
        })
}

/// A catalog read that failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Sql(#[from] tokio_postgres::Error),
    #[error("PostgreSQL gave `{value}` as the {what}, which is not an LSN")]
    Unexpected { what: String, value: String },
}

/// A failed catalog read as the source's error, saying what it was doing.
pub(super) fn catalog_error(
    addr: &str,
    user: &str,
    during: &'static str,
    error: impl Into<CatalogError>,
) -> SourceError {
    match error.into() {
        CatalogError::Sql(error) => SourceError::from_sql(addr, user, during, error),
        unexpected @ CatalogError::Unexpected { .. } => SourceError::Protocol {
            addr: addr.to_owned(),
            during,
            reason: unexpected.to_string(),
        },
    }
}

/// A publication and what it publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicationInfo {
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// Its tables in name order, each once, with the columns and rows it publishes.
    pub tables: Vec<PublishedTable>,
}

/// Publication `name` with its tables, or `None` when there is none.
pub async fn publication(
    client: &Client,
    name: &str,
) -> Result<Option<PublicationInfo>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(None);
    };
    let version = server_version(client).await?;
    Ok(Some(PublicationInfo {
        all_tables: row.get(0),
        tables: published_tables(client, name, version).await?,
    }))
}

/// The tables `publication` publishes that the current role may not read
/// (`schema.table`, in name order): the initial snapshot cannot copy them.
pub async fn unreadable_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 \
             AND NOT has_table_privilege(quote_ident(schemaname) || '.' || quote_ident(tablename), 'SELECT') \
             ORDER BY 1",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Creates publication `name` for `tables` (`schema.table` or `table`).
pub async fn create_publication(
    client: &Client,
    name: &str,
    tables: &[String],
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&create_publication_sql(name, tables))
        .await
}

/// PostgreSQL's estimate of the rows `publication` publishes (0 for tables never
/// analyzed).
pub async fn published_rows_estimate(
    client: &Client,
    publication: &str,
) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::int8 FROM pg_publication_tables p \
             JOIN pg_class c ON c.oid = format('%I.%I', p.schemaname, p.tablename)::regclass \
             WHERE p.pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

/// PostgreSQL's estimate of the rows of relation `oid`; `None` if never analyzed.
pub async fn rows_estimate(
    client: &Client,
    oid: u32,
) -> Result<Option<u64>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT reltuples::int8 FROM pg_class WHERE oid = $1",
            &[&oid],
        )
        .await?;
    let estimate: i64 = row.get(0);
    Ok((estimate >= 0).then_some(estimate as u64))
}

/// What a publication publishes of one table, from `pg_publication_tables`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedTable {
    pub schema: String,
    pub name: String,
    /// The published columns (`attnames`); `None` (no `attnames`, as before
    /// PostgreSQL 15): every column pgoutput sends of a table without a column list.
    pub columns: Option<Vec<String>>,
    /// The row filters (`rowfilter`), any of which lets a row through; `None`: every
    /// row (no filter, `FOR ALL TABLES`, `TABLES IN SCHEMA`, before PostgreSQL 15).
    pub row_filters: Option<Vec<String>>,
}

/// The tables of `publication` in name order, each with the columns and the rows it
/// publishes of it. Column lists and row filters exist from PostgreSQL 15 on.
pub async fn published_tables(
    client: &tokio_postgres::Client,
    publication: &str,
    server_version: i32,
) -> Result<Vec<PublishedTable>, tokio_postgres::Error> {
    let sql = if server_version >= PG15 {
        "SELECT schemaname::text, tablename::text, attnames::text[], rowfilter \
         FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2"
    } else {
        "SELECT schemaname::text, tablename::text, NULL::text[], NULL::text \
         FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2"
    };
    let rows = client.query(sql, &[&publication]).await?;
    Ok(combine(rows.iter().map(|r| PublishedTable {
        schema: r.get(0),
        name: r.get(1),
        columns: r.get(2),
        row_filters: r.get::<_, Option<String>>(3).map(|f| vec![f]),
    })))
}

/// One entry per table, from rows in table order. A table listed more than once (once
/// per publication; one publication lists each table once) has its row filters merged
/// as PostgreSQL's table sync merges them: no filter in one of them means every row,
/// else the distinct filters are OR-ed. Its columns are the union of the lists, none
/// meaning every column (pgoutput refuses a table whose publications list different
/// columns).
fn combine(rows: impl IntoIterator<Item = PublishedTable>) -> Vec<PublishedTable> {
    let mut tables: Vec<PublishedTable> = Vec::new();
    for row in rows {
        let Some(last) = tables
            .last_mut()
            .filter(|t| t.schema == row.schema && t.name == row.name)
        else {
            tables.push(row);
            continue;
        };
        last.columns = match (last.columns.take(), row.columns) {
            (Some(mut columns), Some(more)) => {
                for column in more {
                    if !columns.contains(&column) {
                        columns.push(column);
                    }
                }
                Some(columns)
            }
            _ => None,
        };
        last.row_filters = match (last.row_filters.take(), row.row_filters) {
            (Some(mut filters), Some(more)) => {
                for filter in more {
                    if !filters.contains(&filter) {
                        filters.push(filter);
                    }
                }
                Some(filters)
            }
            _ => None,
        };
    }
    tables
}

/// A published table as pgoutput describes it: its published columns in order (the
/// column list's, else all but dropped and generated ones; generated ones only where
/// PostgreSQL 18 publishes them), key flags, replica identity, domains resolved. With
/// it, whether it is a plain table (`relkind = 'r'`, copied with `ONLY`).
pub async fn describe(
    client: &tokio_postgres::Client,
    table: &PublishedTable,
    server_version: i32,
) -> Result<(Relation, bool), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT c.oid, c.relreplident::text, c.relkind = 'r' FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await?;
    let oid: u32 = row.get(0);
    let identity: String = row.get(1);
    let plain: bool = row.get(2);
    let replica_identity = match identity.as_str() {
        "n" => ReplicaIdentity::Nothing,
        "f" => ReplicaIdentity::Full,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, \
             EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid AND a.attnum = ANY(i.indkey) \
                     AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident))) \
             OR c.relreplident = 'f' \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             AND CASE WHEN $2::text[] IS NULL THEN a.attgenerated = '' \
                 ELSE a.attname::text = ANY($2::text[]) AND (a.attgenerated = '' OR $3) END \
             ORDER BY a.attnum",
            // Before 18, attnames may list generated columns that pgoutput never sends.
            &[&oid, &table.columns, &(server_version >= PG18)],
        )
        .await?;
    let mut columns = Vec::with_capacity(rows.len());
    for row in rows {
        let mut column = Column {
            name: row.get(0),
            type_oid: row.get(1),
            type_modifier: row.get(2),
            key: row.get(3),
        };
        if column.type_oid >= FIRST_NORMAL_OID {
            let (base, typmod) = resolve_type(client, column.type_oid).await?;
            column.type_oid = base;
            if column.type_modifier == -1 {
                column.type_modifier = typmod;
            }
        }
        columns.push(column);
    }
    let relation = Relation {
        comment_classes: comment_classes(client, oid).await?,
        oid,
        schema: table.schema.clone(),
        name: table.name.clone(),
        replica_identity,
        columns,
    };
    Ok((relation, plain))
}

/// The classes the comments of relation `oid`'s columns give (`airlock: CLASS` in
/// `COMMENT ON COLUMN`), by column name.
pub async fn comment_classes(
    client: &tokio_postgres::Client,
    oid: u32,
) -> Result<std::collections::BTreeMap<String, String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, d.description FROM pg_description d \
             JOIN pg_attribute a ON a.attrelid = d.objoid AND a.attnum = d.objsubid \
             WHERE d.classoid = 'pg_class'::regclass AND d.objoid = $1 AND d.objsubid > 0 \
             AND NOT a.attisdropped",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let comment: String = row.get(1);
            let class = crate::policy::comment_class(&comment)?.to_owned();
            Some((row.get::<_, String>(0), class))
        })
        .collect())
}

/// OIDs below this are built into PostgreSQL; types at or above it (domains, enums,
/// composite and range types, their arrays) are looked up in the catalog.
pub const FIRST_NORMAL_OID: u32 = 16_384;

/// `(base type, type modifier)` of a type: for a domain, the base type of the
/// (innermost) domain and the outermost type modifier; for an array of a domain, the
/// array type of its base type; otherwise the type itself and -1.
pub async fn resolve_type(
    client: &tokio_postgres::Client,
    type_oid: u32,
) -> Result<(u32, i32), tokio_postgres::Error> {
    const QUERY: &str = "SELECT typtype::text, typbasetype, typtypmod, typelem, typcategory::text, \
                         (SELECT b.typarray FROM pg_type b WHERE b.oid = t.typelem) \
                         FROM pg_type t WHERE oid = $1";
    let mut current = type_oid;
    let mut typmod = -1;
    // Domains over domains: bounded, in case the catalog is odd.
    for _ in 0..16 {
        let Some(row) = client.query_opt(QUERY, &[&current]).await? else {
            break;
        };
        let typtype: String = row.get(0);
        if typtype == "d" {
            let domain_typmod: i32 = row.get(2);
            if typmod == -1 {
                typmod = domain_typmod;
            }
            current = row.get(1);
            continue;
        }
        let element: u32 = row.get(3);
        let category: String = row.get(4);
        if category == "A" && element >= FIRST_NORMAL_OID {
            let (base, element_typmod) = Box::pin(resolve_type(client, element)).await?;
            if base != element {
                let array: Option<u32> = client
                    .query_opt("SELECT typarray FROM pg_type WHERE oid = $1", &[&base])
                    .await?
                    .map(|r| r.get(0));
                if let Some(array) = array.filter(|a| *a != 0) {
                    current = array;
                    if typmod == -1 {
                        typmod = element_typmod;
                    }
                }
            }
        }
        break;
    }
    Ok((current, typmod))
}

/// `CREATE PUBLICATION "pub" FOR TABLE "schema"."table", ...` for `[source] tables`.
fn create_publication_sql(publication: &str, tables: &[String]) -> String {
    let tables: Vec<String> = tables
        .iter()
        .map(|t| match t.split_once('.') {
            Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
            None => quote_ident(t),
        })
        .collect();
    format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        quote_ident(publication),
        tables.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(name: &str, columns: Option<&[&str]>, filter: Option<&str>) -> PublishedTable {
        PublishedTable {
            schema: "public".into(),
            name: name.into(),
            columns: columns.map(|c| c.iter().map(|c| c.to_string()).collect()),
            row_filters: filter.map(|f| vec![f.to_owned()]),
        }
    }

    #[test]
    fn a_table_in_several_publications_is_copied_as_any_of_them_publishes_it() {
        let merged = combine([
            published("a", Some(&["id", "x"]), Some("(x > 1)")),
            published("a", Some(&["id", "y"]), Some("(y = 'eu'::text)")),
            published("a", Some(&["id"]), Some("(x > 1)")),
            published("b", Some(&["id"]), Some("(id > 1)")),
            published("b", None, None),
            published("c", Some(&["id"]), None),
        ]);
        assert_eq!(
            merged,
            [
                PublishedTable {
                    row_filters: Some(vec!["(x > 1)".into(), "(y = 'eu'::text)".into()]),
                    ..published("a", Some(&["id", "x", "y"]), None)
                },
                published("b", None, None),
                published("c", Some(&["id"]), None),
            ]
        );
    }

    #[test]
    fn wal_levels_read_as_postgresql_spells_them() {
        assert_eq!(WalLevel::parse("logical"), WalLevel::Logical);
        assert_eq!(WalLevel::parse("hot_standby"), WalLevel::Replica);
        assert_eq!(WalLevel::parse("odd").to_string(), "odd");
    }

    #[test]
    fn a_publication_names_its_tables_quoted() {
        assert_eq!(
            create_publication_sql("p\"q", &["public.t".into(), "Odd".into()]),
            r#"CREATE PUBLICATION "p""q" FOR TABLE "public"."t", "Odd""#
        );
    }
}
