//! Guest calls whose strings and lists are read where they are, in guest memory.
//!
//! The generated bindings lift every argument into host memory before the host
//! function runs: a guest that passes its whole memory as one string (to `log`, a
//! route, `set` …) makes the host hold a second copy of it for the length of the
//! call, past every limit. These definitions replace the generated ones for each call
//! that takes a string or a list; each reads its arguments in place and copies only
//! what it keeps, after it knows the call is allowed:
//!
//! ```text
//! guest memory ─ WasmStr / WasmList (no copy) ─▶ check: names, output room, bounds
//!                                                  │ refused: error, nothing copied
//!                                                  ▼
//!                                   copy what is kept ─▶ the HostBatch method
//! ```
//!
//! Invariants:
//! - A call copies at most what the output cap still has room for (values, routes,
//!   tags, annotations), [`crate::pipeline::output::MAX_LINE`] (`log`: the line as
//!   kept), 256 bytes (`column-index`:
//!   no PostgreSQL name is longer) or 64 KiB (`hash-column`'s salt); so one hostile
//!   guest raises host memory by at most its memory limit, the output cap and a
//!   little more.
//! - Everything else the call does, and every error it gives, is the generated
//!   method's: these definitions only check and copy, then delegate.
//! - Strings in UTF-8 (what Rust, C, Python and JavaScript guests use) are not copied
//!   to be checked; a guest that declares UTF-16 strings has them transcoded first.

use std::borrow::Cow;

use wasmtime::StoreContextMut;
use wasmtime::component::{ComponentType, Lift, Linker, Resource, WasmList, WasmStr};

use super::{GuestBatch, GuestState, wit};
use wit::HostBatch as _;

/// The longest column name looked up; PostgreSQL's names have at most 63 bytes.
const MAX_COLUMN_NAME: usize = 256;
/// The longest `hash-column` salt.
const MAX_SALT: usize = 64 * 1024;

/// `value`, with its strings and bytes left in guest memory.
#[derive(ComponentType, Lift)]
#[component(variant)]
enum ValueRef {
    #[component(name = "null")]
    Null,
    #[component(name = "unchanged-toast")]
    UnchangedToast,
    #[component(name = "boolean")]
    Boolean(bool),
    #[component(name = "int")]
    Int(i64),
    #[component(name = "float")]
    Float(f64),
    #[component(name = "numeric")]
    Numeric(WasmStr),
    #[component(name = "text")]
    Text(WasmStr),
    #[component(name = "bytes")]
    Bytes(WasmList<u8>),
    #[component(name = "date")]
    Date(i32),
    #[component(name = "time")]
    Time(i64),
    #[component(name = "timestamp")]
    Timestamp(i64),
    #[component(name = "timestamptz")]
    Timestamptz(i64),
    #[component(name = "uuid")]
    Uuid((u64, u64)),
    #[component(name = "json")]
    Json(WasmStr),
    #[component(name = "other")]
    Other(WasmStr),
}

/// `text-column`, with its lists left in guest memory.
#[derive(ComponentType, Lift)]
#[component(record)]
struct TextColumnRef {
    kinds: WasmList<u8>,
    data: WasmList<u8>,
    offsets: WasmList<u32>,
}

/// `int-column`, with its lists left in guest memory.
#[derive(ComponentType, Lift)]
#[component(record)]
struct IntColumnRef {
    valid: WasmList<u8>,
    values: WasmList<i64>,
}

/// `float-column`, with its lists left in guest memory.
#[derive(ComponentType, Lift)]
#[component(record)]
struct FloatColumnRef {
    valid: WasmList<u8>,
    values: WasmList<f64>,
}

/// `bool-column`, with its lists left in guest memory.
#[derive(ComponentType, Lift)]
#[component(record)]
struct BoolColumnRef {
    valid: WasmList<u8>,
    values: WasmList<bool>,
}

type Store<'a> = StoreContextMut<'a, GuestState>;

fn text<'a>(store: &'a Store<'_>, s: &WasmStr) -> wasmtime::Result<Cow<'a, str>> {
    s.to_str(store)
}

impl ValueRef {
    /// The bytes the value holds outside its enum (what a copy allocates).
    fn len(&self, store: &Store<'_>) -> wasmtime::Result<usize> {
        Ok(match self {
            ValueRef::Numeric(s) | ValueRef::Text(s) | ValueRef::Json(s) | ValueRef::Other(s) => {
                text(store, s)?.len()
            }
            ValueRef::Bytes(b) => b.len(),
            _ => 0,
        })
    }

    fn to_owned(&self, store: &Store<'_>) -> wasmtime::Result<wit::Value> {
        let owned = |s: &WasmStr| text(store, s).map(Cow::into_owned);
        Ok(match self {
            ValueRef::Null => wit::Value::Null,
            ValueRef::UnchangedToast => wit::Value::UnchangedToast,
            ValueRef::Boolean(b) => wit::Value::Boolean(*b),
            ValueRef::Int(i) => wit::Value::Int(*i),
            ValueRef::Float(f) => wit::Value::Float(*f),
            ValueRef::Numeric(s) => wit::Value::Numeric(owned(s)?),
            ValueRef::Text(s) => wit::Value::Text(owned(s)?),
            ValueRef::Bytes(b) => wit::Value::Bytes(b.as_le_slice(store).to_vec()),
            ValueRef::Date(d) => wit::Value::Date(*d),
            ValueRef::Time(t) => wit::Value::Time(*t),
            ValueRef::Timestamp(t) => wit::Value::Timestamp(*t),
            ValueRef::Timestamptz(t) => wit::Value::Timestamptz(*t),
            ValueRef::Uuid(u) => wit::Value::Uuid(*u),
            ValueRef::Json(s) => wit::Value::Json(owned(s)?),
            ValueRef::Other(s) => wit::Value::Other(owned(s)?),
        })
    }
}

/// Fails, as the output cap does, unless the batch has room for `bytes` more.
fn ensure_room(store: &Store<'_>, b: &Resource<GuestBatch>, bytes: usize) -> wasmtime::Result<()> {
    store.data().table.get(b)?.ensure_room(bytes)
}

/// Replaces the generated definitions of every call that takes a string or a list.
pub fn define(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.root().func_wrap(
        "log",
        |store: Store<'_>, (level, message): (wit::Level, WasmStr)| {
            let message = text(&store, &message)?;
            // The log keeps at most MAX_LINE bytes of it: nothing else is copied.
            store.data().log.line(super::tracing_level(level), &message);
            Ok(())
        },
    )?;
    let mut types = linker.instance(&format!(
        "{}/types@{}",
        super::CONTRACT_PACKAGE,
        super::CONTRACT_VERSION
    ))?;
    types.func_wrap(
        "[method]batch.column-index",
        |mut store: Store<'_>, (b, table, name): (Resource<GuestBatch>, u32, WasmStr)| {
            let name = text(&store, &name)?;
            if name.len() > MAX_COLUMN_NAME {
                // No column has such a name; the table index is still checked.
                store.data().table.get(&b)?.table(table)?;
                return Ok((None,));
            }
            let name = name.into_owned();
            Ok((store.data_mut().column_index(b, table, name)?,))
        },
    )?;
    types.func_wrap(
        "[method]batch.add-route",
        |mut store: Store<'_>, (b, row, route): (Resource<GuestBatch>, u32, WasmStr)| {
            let route = text(&store, &route)?;
            store
                .data()
                .names
                .check_route(&route)
                .map_err(|e| wasmtime::format_err!("{e}"))?;
            ensure_room(&store, &b, route.len())?;
            let route = route.into_owned();
            store.data_mut().add_route(b, row, route)
        },
    )?;
    types.func_wrap(
        "[method]batch.tag-row",
        |mut store: Store<'_>, (b, row, tag): (Resource<GuestBatch>, u32, WasmStr)| {
            let tag = checked_tag(&store, &b, &tag)?;
            store.data_mut().tag_row(b, row, tag)
        },
    )?;
    types.func_wrap(
        "[method]batch.tag-column",
        |mut store: Store<'_>,
         (b, table, column, tag): (Resource<GuestBatch>, u32, u32, WasmStr)| {
            let tag = checked_tag(&store, &b, &tag)?;
            store.data_mut().tag_column(b, table, column, tag)
        },
    )?;
    types.func_wrap(
        "[method]batch.annotate",
        |mut store: Store<'_>,
         (b, row, key, value): (Resource<GuestBatch>, u32, WasmStr, WasmStr)| {
            let (key, value) = (text(&store, &key)?, text(&store, &value)?);
            ensure_room(&store, &b, key.len() + value.len())?;
            let (key, value) = (key.into_owned(), value.into_owned());
            store.data_mut().annotate(b, row, key, value)
        },
    )?;
    types.func_wrap(
        "[method]batch.set",
        |mut store: Store<'_>,
         (b, row, column, image, value): (Resource<GuestBatch>, u32, u32, wit::Image, ValueRef)| {
            ensure_room(&store, &b, value.len(&store)?)?;
            let value = value.to_owned(&store)?;
            store.data_mut().set(b, row, column, image, value)
        },
    )?;
    types.func_wrap(
        "[method]batch.write-column",
        |mut store: Store<'_>,
         (b, table, column, image, values): (
            Resource<GuestBatch>,
            u32,
            u32,
            wit::Image,
            WasmList<ValueRef>,
        )| {
            let refs: Vec<ValueRef> = values.iter(&mut store)?.collect::<wasmtime::Result<_>>()?;
            let mut total = 0usize;
            for value in &refs {
                total = total.saturating_add(value.len(&store)?);
            }
            ensure_room(&store, &b, total)?;
            let values = refs
                .iter()
                .map(|v| v.to_owned(&store))
                .collect::<wasmtime::Result<Vec<_>>>()?;
            store
                .data_mut()
                .write_column(b, table, column, image, values)
        },
    )?;
    types.func_wrap(
        "[method]batch.write-text-column",
        |mut store: Store<'_>,
         (b, table, column, image, values): (
            Resource<GuestBatch>,
            u32,
            u32,
            wit::Image,
            TextColumnRef,
        )| {
            let owned = packed(&store, &b, &values)?;
            store
                .data_mut()
                .write_text_column(b, table, column, image, owned)
        },
    )?;
    types.func_wrap(
        "[method]batch.hash-column",
        |mut store: Store<'_>,
         (b, table, column, image, salt): (
            Resource<GuestBatch>,
            u32,
            u32,
            wit::Image,
            WasmList<u8>,
        )| {
            if salt.len() > MAX_SALT {
                wasmtime::bail!(
                    "hash-column: the salt has {} bytes; at most {MAX_SALT} are accepted",
                    salt.len()
                );
            }
            let salt = salt.as_le_slice(&store).to_vec();
            Ok((store
                .data_mut()
                .hash_column(b, table, column, image, salt)?,))
        },
    )?;
    types.func_wrap(
        "[method]batch.rows-tagged",
        |store: Store<'_>, (b, table, tag): (Resource<GuestBatch>, u32, WasmStr)| {
            // Compared where it lies: the tag is never copied.
            let tag = text(&store, &tag)?;
            Ok((store.data().table.get(&b)?.rows_tagged(table, &tag)?,))
        },
    )?;
    types.func_wrap(
        "[method]batch.drop-rows",
        |mut store: Store<'_>, (b, rows): (Resource<GuestBatch>, WasmList<u32>)| {
            let rows = row_list(&store, &b, "drop-rows", &rows)?;
            store.data_mut().drop_rows(b, rows)
        },
    )?;
    types.func_wrap(
        "[method]batch.add-route-rows",
        |mut store: Store<'_>, (b, rows, route): (Resource<GuestBatch>, WasmList<u32>, WasmStr)| {
            let route = text(&store, &route)?;
            store
                .data()
                .names
                .check_route(&route)
                .map_err(|e| wasmtime::format_err!("{e}"))?;
            ensure_room(&store, &b, route.len())?;
            let route = route.into_owned();
            let rows = row_list(&store, &b, "add-route-rows", &rows)?;
            store.data_mut().add_route_rows(b, rows, route)
        },
    )?;
    types.func_wrap(
        "[method]batch.tag-rows",
        |mut store: Store<'_>, (b, rows, tag): (Resource<GuestBatch>, WasmList<u32>, WasmStr)| {
            let tag = checked_tag(&store, &b, &tag)?;
            let rows = row_list(&store, &b, "tag-rows", &rows)?;
            store.data_mut().tag_rows(b, rows, tag)
        },
    )?;
    types.func_wrap(
        "[method]batch.annotate-rows",
        |mut store: Store<'_>,
         (b, rows, key, value): (Resource<GuestBatch>, WasmList<u32>, WasmStr, WasmStr)| {
            let (key, value) = (text(&store, &key)?, text(&store, &value)?);
            ensure_room(&store, &b, key.len() + value.len())?;
            let (key, value) = (key.into_owned(), value.into_owned());
            let rows = row_list(&store, &b, "annotate-rows", &rows)?;
            store.data_mut().annotate_rows(b, rows, key, value)
        },
    )?;
    types.func_wrap(
        "[method]batch.write-ints",
        |mut store: Store<'_>,
         (b, table, column, image, values): (
            Resource<GuestBatch>,
            u32,
            u32,
            wit::Image,
            IntColumnRef,
        )| {
            entries(
                &store,
                &b,
                "write-ints",
                table,
                values.valid.len(),
                values.values.len(),
            )?;
            let owned = wit::IntColumn {
                valid: values.valid.as_le_slice(&store).to_vec(),
                values: values.values.as_le_slice(&store).to_vec(),
            };
            store.data_mut().write_ints(b, table, column, image, owned)
        },
    )?;
    types.func_wrap(
        "[method]batch.write-floats",
        |mut store: Store<'_>,
         (b, table, column, image, values): (
            Resource<GuestBatch>,
            u32,
            u32,
            wit::Image,
            FloatColumnRef,
        )| {
            entries(
                &store,
                &b,
                "write-floats",
                table,
                values.valid.len(),
                values.values.len(),
            )?;
            let owned = wit::FloatColumn {
                valid: values.valid.as_le_slice(&store).to_vec(),
                values: values
                    .values
                    .iter(&mut store)?
                    .collect::<wasmtime::Result<_>>()?,
            };
            store
                .data_mut()
                .write_floats(b, table, column, image, owned)
        },
    )?;
    types.func_wrap(
        "[method]batch.write-bools",
        |mut store: Store<'_>,
         (b, table, column, image, values): (
            Resource<GuestBatch>,
            u32,
            u32,
            wit::Image,
            BoolColumnRef,
        )| {
            entries(
                &store,
                &b,
                "write-bools",
                table,
                values.valid.len(),
                values.values.len(),
            )?;
            let owned = wit::BoolColumn {
                valid: values.valid.as_le_slice(&store).to_vec(),
                values: values
                    .values
                    .iter(&mut store)?
                    .collect::<wasmtime::Result<_>>()?,
            };
            store.data_mut().write_bools(b, table, column, image, owned)
        },
    )?;
    types.func_wrap(
        "[method]batch.write-bytes-column",
        |mut store: Store<'_>,
         (b, table, column, image, values): (
            Resource<GuestBatch>,
            u32,
            u32,
            wit::Image,
            TextColumnRef,
        )| {
            let owned = packed(&store, &b, &values)?;
            store
                .data_mut()
                .write_bytes_column(b, table, column, image, owned)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A bulk call's rows, copied once the list is known to be no longer than the batch
/// (a longer list only repeats rows; refusing it bounds the copy).
fn row_list(
    store: &Store<'_>,
    b: &Resource<GuestBatch>,
    call: &str,
    rows: &WasmList<u32>,
) -> wasmtime::Result<Vec<u32>> {
    let len = store.data().table.get(b)?.batch.rows.len();
    if rows.len() > len {
        wasmtime::bail!(
            "{call} got {} rows, but the batch has {len}: list each row at most once",
            rows.len()
        );
    }
    Ok(rows.as_le_slice(store).to_vec())
}

/// Fails unless a typed column write has one entry per row of the table (checked
/// before its lists are copied).
fn entries(
    store: &Store<'_>,
    b: &Resource<GuestBatch>,
    call: &str,
    table: u32,
    valid: usize,
    values: usize,
) -> wasmtime::Result<()> {
    store
        .data()
        .table
        .get(b)?
        .check_entries(call, table, valid, values)
}

/// A packed column, copied once the output cap has room for it: the data is copied
/// once and each value once more out of it, so both must fit. Ranges the method will
/// refuse count as they are written.
fn packed(
    store: &Store<'_>,
    b: &Resource<GuestBatch>,
    values: &TextColumnRef,
) -> wasmtime::Result<wit::TextColumn> {
    let offsets = values.offsets.as_le_slice(store);
    let kept: usize = offsets
        .windows(2)
        .zip(values.kinds.as_le_slice(store))
        .filter(|(_, kind)| **kind == 2)
        .map(|(w, _)| w[1].saturating_sub(w[0]) as usize)
        .fold(0usize, usize::saturating_add);
    let lists = values.kinds.len() + 4 * values.offsets.len();
    ensure_room(
        store,
        b,
        values.data.len().saturating_add(kept).saturating_add(lists),
    )?;
    Ok(wit::TextColumn {
        kinds: values.kinds.as_le_slice(store).to_vec(),
        data: values.data.as_le_slice(store).to_vec(),
        offsets: offsets.to_vec(),
    })
}

/// A tag, checked against the declared names and the output room, then copied.
fn checked_tag(
    store: &Store<'_>,
    b: &Resource<GuestBatch>,
    tag: &WasmStr,
) -> wasmtime::Result<String> {
    let tag = text(store, tag)?;
    store
        .data()
        .names
        .check_tag(&tag)
        .map_err(|e| wasmtime::format_err!("{e}"))?;
    ensure_room(store, b, tag.len())?;
    Ok(tag.into_owned())
}
