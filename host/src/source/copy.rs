//! Reading a table with COPY, as the initial and the incremental snapshots do: the
//! statement that reads what the publication publishes of a table (or of a range of
//! its pages), a connection in an exported snapshot, and the reader that parses COPY
//! text into chunks of `Op::Read` changes.

use std::pin::pin;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::debug;

use super::catalog::catalog_error;
use super::error::SourceError;
use super::protocol::quote_ident;
use crate::change::{Change, Lsn, Op, Relation};

/// Rows per snapshot chunk (one transaction downstream).
pub const CHUNK_ROWS: usize = 10_000;
/// Bytes of values per snapshot chunk, whichever comes first.
pub const CHUNK_BYTES: usize = 8 << 20;
/// A connection in the exported snapshot `snapshot`, for one more reader.
pub(super) async fn open_reader(
    connect: &super::protocol::ConnectConfig,
    snapshot: &str,
) -> Result<Arc<tokio_postgres::Client>, SourceError> {
    let (client, connection) = connect.connect_sql().await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(error = %error, "snapshot reader connection ended");
        }
    });
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            super::protocol::quote_literal(snapshot)
        ))
        .await
        .map_err(|e| catalog_error(&connect.addr(), &connect.user, "importing the snapshot", e))?;
    Ok(Arc::new(client))
}

/// Reads one COPY as parsed rows (`Op::Read`, LSN `at` until the caller numbers
/// them), in chunks of at most [`CHUNK_ROWS`] rows or [`CHUNK_BYTES`], sent on `out`.
/// Returns the rows read; stops early, without error, when `out` is closed.
pub(super) async fn read_copy(
    client: &tokio_postgres::Client,
    sql: &str,
    relation: &Arc<Relation>,
    at: Lsn,
    out: &mpsc::Sender<Vec<Change>>,
    fail: impl Fn(tokio_postgres::Error) -> SourceError,
) -> Result<u64, SourceError> {
    let stream = client.copy_out(sql).await.map_err(&fail)?;
    let mut stream = pin!(stream);
    let mut pending: Vec<u8> = Vec::new();
    let mut changes: Vec<Change> = Vec::new();
    let (mut bytes, mut rows) = (0usize, 0u64);
    loop {
        let next = stream.next().await;
        let end = next.is_none();
        if let Some(data) = next {
            pending.extend_from_slice(&data.map_err(&fail)?);
        }
        // Whole lines only; the rest waits for the next piece.
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + nl];
            start += nl + 1;
            changes.push(Change {
                identity: None,
                relation: relation.clone(),
                op: Op::Read,
                lsn: at,
                new: Some(parse_row(relation, line, at)?),
                old: None,
            });
            bytes += line.len();
            rows += 1;
        }
        pending.drain(..start);
        if changes.len() >= CHUNK_ROWS || bytes >= CHUNK_BYTES || (end && !changes.is_empty()) {
            if out.send(std::mem::take(&mut changes)).await.is_err() {
                return Ok(rows);
            }
            bytes = 0;
        }
        if end {
            return Ok(rows);
        }
    }
}

/// The COPY that reads what the publication publishes of `relation`: its columns (the
/// published ones), of its own rows if `only` (a plain table, whose inheritance
/// children are tables of their own), those that any of `row_filters` lets through.
/// Names are quoted; the filters are PostgreSQL's own deparsed expressions.
pub(super) fn copy_sql(
    relation: &Relation,
    only: bool,
    row_filters: Option<&[String]>,
    pages: Option<(i64, Option<i64>)>,
) -> String {
    let columns: Vec<String> = relation
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let mut sql = format!(
        "COPY (SELECT {} FROM {}{}.{}",
        columns.join(", "),
        if only { "ONLY " } else { "" },
        quote_ident(&relation.schema),
        quote_ident(&relation.name)
    );
    let mut conditions = Vec::new();
    if let Some(filters) = row_filters.filter(|f| !f.is_empty()) {
        let filters: Vec<String> = filters.iter().map(|f| format!("({f})")).collect();
        conditions.push(filters.join(" OR "));
    }
    // A range of pages: a TID range scan reads only those.
    if let Some((from, to)) = pages {
        conditions.push(format!("ctid >= '({from},0)'::tid"));
        if let Some(to) = to {
            conditions.push(format!("ctid < '({to},0)'::tid"));
        }
    }
    if !conditions.is_empty() {
        sql.push_str(" WHERE ");
        if conditions.len() == 1 {
            sql.push_str(&conditions[0]);
        } else {
            let wrapped: Vec<String> = conditions.iter().map(|c| format!("({c})")).collect();
            sql.push_str(&wrapped.join(" AND "));
        }
    }
    sql.push_str(") TO STDOUT");
    sql
}

/// One line of COPY text output as typed values.
pub(super) fn parse_row(
    relation: &Relation,
    line: &[u8],
    lsn: Lsn,
) -> Result<Vec<crate::change::Value>, SourceError> {
    let fields: Vec<&[u8]> = if relation.columns.is_empty() {
        Vec::new()
    } else {
        line.split(|&b| b == b'\t').collect()
    };
    if fields.len() != relation.columns.len() {
        return Err(SourceError::Snapshot {
            table: relation.qualified_name(),
            during: "parsing COPY output",
            reason: format!(
                "a row has {} fields, the table {} columns",
                fields.len(),
                relation.columns.len()
            ),
        });
    }
    let mut values = Vec::with_capacity(fields.len());
    for (column, field) in relation.columns.iter().zip(fields) {
        if field == b"\\N" {
            values.push(crate::change::Value::Null);
            continue;
        }
        let text = unescape(field);
        values.push(
            crate::change::text::parse_value(column, &text).map_err(|source| {
                SourceError::Value {
                    relation: relation.qualified_name(),
                    lsn,
                    source,
                }
            })?,
        );
    }
    Ok(values)
}

/// Undoes COPY text escaping (`\\`, `\t`, `\n`, `\r`, `\b`, `\f`, `\v`, octal).
fn unescape(field: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !field.contains(&b'\\') {
        return std::borrow::Cow::Borrowed(field);
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i == field.len() {
            out.push(b);
            continue;
        }
        let c = field[i];
        i += 1;
        out.push(match c {
            b't' => b'\t',
            b'n' => b'\n',
            b'r' => b'\r',
            b'b' => 8,
            b'f' => 12,
            b'v' => 11,
            b'0'..=b'7' => {
                let mut value = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                value as u8
            }
            other => other,
        });
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Column, ReplicaIdentity};

    #[test]
    fn copy_text_escapes_are_undone() {
        assert_eq!(&*unescape(b"plain"), b"plain");
        assert_eq!(&*unescape(b"a\\tb\\nc\\\\d\\101"), b"a\tb\nc\\dA");
    }

    #[test]
    fn the_copy_selects_the_published_columns_and_rows() {
        let column = |name: &str| Column {
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
            key: false,
        };
        let relation = Relation {
            comment_classes: Default::default(),
            oid: 1,
            schema: "Sales".into(),
            name: "odd\"name".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![column("id"), column("Region")],
        };
        assert_eq!(
            copy_sql(&relation, true, None, None),
            r#"COPY (SELECT "id", "Region" FROM ONLY "Sales"."odd""name") TO STDOUT"#
        );
        let filters = [
            "(id > 10)".to_owned(),
            "(\"Region\" = 'eu'::text)".to_owned(),
        ];
        assert_eq!(
            copy_sql(&relation, false, Some(&filters), None),
            r#"COPY (SELECT "id", "Region" FROM "Sales"."odd""name" WHERE ((id > 10)) OR (("Region" = 'eu'::text))) TO STDOUT"#
        );
        assert_eq!(
            copy_sql(&relation, true, Some(&filters[..1]), Some((100, Some(200)))),
            r#"COPY (SELECT "id", "Region" FROM ONLY "Sales"."odd""name" WHERE (((id > 10))) AND (ctid >= '(100,0)'::tid) AND (ctid < '(200,0)'::tid)) TO STDOUT"#
        );
        assert_eq!(
            copy_sql(&relation, true, None, Some((200, None))),
            r#"COPY (SELECT "id", "Region" FROM ONLY "Sales"."odd""name" WHERE ctid >= '(200,0)'::tid) TO STDOUT"#
        );
        let nothing = Relation {
            comment_classes: Default::default(),
            columns: Vec::new(),
            ..relation
        };
        assert_eq!(
            copy_sql(&nothing, true, Some(&[]), None),
            r#"COPY (SELECT  FROM ONLY "Sales"."odd""name") TO STDOUT"#
        );
    }
}
