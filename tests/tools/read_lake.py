"""Reads a Delta table of the airlock lake with an independent reader and prints
its rows as JSON lines, in change order (_commit_lsn, _lsn).

usage: python3 read_lake.py duckdb|deltalake TABLE_DIR
       python3 read_lake.py duckdb-query TABLE_DIR "SELECT ... FROM lake"

duckdb: DuckDB's delta extension (delta_scan), loaded by file path from the
duckdb-extension-delta wheel. deltalake: the deltalake Python package.
Decimals, timestamps and bytes are printed as exact text.
"""
import datetime
import decimal
import json
import math
import os
import sys
import uuid


def plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinities: keep them as PostgreSQL writes them.
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    return value


def read_duckdb(table, query=None):
    try:
        import duckdb
        import duckdb_extension_delta
    except ImportError as error:
        sys.exit(f"missing Python package ({error}): pip install duckdb==1.5.5 duckdb-extension-delta==1.5.5")
    ext = os.path.join(os.path.dirname(duckdb_extension_delta.__file__), "extensions",
                       "v" + duckdb.__version__, "delta.duckdb_extension")
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD '{ext}'")
    quoted = table.replace("'", "''")
    scan = f"delta_scan('{quoted}')"
    if query is None:
        query = "SELECT * FROM lake ORDER BY _commit_lsn, _lsn"
    cur = con.execute(f"WITH lake AS (SELECT * FROM {scan}) {query}")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def read_deltalake(table):
    try:
        import deltalake
    except ImportError as error:
        sys.exit(f"missing Python package ({error}): pip install deltalake")
    rows = deltalake.DeltaTable(table).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: (r["_commit_lsn"], r["_lsn"]))


def main():
    reader, table = sys.argv[1], sys.argv[2]
    if reader == "duckdb-query":
        rows = read_duckdb(table, sys.argv[3])
    elif reader == "duckdb":
        rows = read_duckdb(table)
    else:
        rows = read_deltalake(table)
    for row in rows:
        print(json.dumps({k: plain(v) for k, v in row.items()}, sort_keys=True))


if __name__ == "__main__":
    main()
