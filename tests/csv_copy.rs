//! The CSV dialect (README.md "CSV dialect") checked against PostgreSQL itself:
//! - whatever text values and NULLs we encode, `COPY … FROM (FORMAT csv, HEADER MATCH, NULL '\N')`
//!   reads back exactly those values (NULL, `""` and `"\N"` stay distinct), and the header we write is
//!   the header PostgreSQL expects;
//! - for a table of many column types, PostgreSQL's own
//!   `COPY … TO STDOUT (FORMAT csv, HEADER, NULL '\N', FORCE_QUOTE *)` under the product's session
//!   settings produces exactly the bytes our encoder produces from the same values fetched as text.

mod common;

use cdc_egress::core::encode::csv::{push_header, push_value};
use cdc_egress::table::quote_ident;
use common::*;
use futures::{SinkExt, TryStreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};

/// Encodes a header and rows exactly as the batcher does: values separated by `,`, rows ended by `\n`.
fn encode(names: &[&str], rows: &[Vec<Option<String>>]) -> Vec<u8> {
    let mut out = Vec::new();
    push_header(&mut out, names.iter().copied());
    for row in rows {
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_value(&mut out, v.as_deref().map(str::as_bytes));
        }
        out.push(b'\n');
    }
    out
}

/// Column names that each need some care in a CSV header.
const NAMES: [&str; 6] = ["a", "b,c", "q\"x", "line\nbreak", "\\N", "\\."];

fn value() -> impl Strategy<Value = Option<String>> {
    let special = prop::sample::select(vec![
        "",
        "\\N",
        "\\.",
        "\"",
        "\"\"",
        ",",
        "\r",
        "\n",
        "\r\n",
        "a,b",
        "say \"hi\"",
        " leading",
        "trailing ",
        "  ",
        "\\",
        "back\\slash\\N",
        "NULL",
        "\\N ",
        " \\N",
        "é🦀 ünïcödé ✓",
        "\u{feff}bom",
        "tab\there",
    ]);
    prop_oneof![
        2 => Just(None),
        4 => special.prop_map(|s| Some(s.to_string())),
        4 => "[\"',\r\n\\\\N. é🦀\t]{0,12}".prop_map(Some),
        3 => any::<String>().prop_map(|s| Some(s.replace('\0', ""))),
    ]
}

/// `(column names in order, rows)`.
fn case() -> impl Strategy<Value = (Vec<&'static str>, Vec<Vec<Option<String>>>)> {
    (Just(NAMES.to_vec()).prop_shuffle(), 1usize..=NAMES.len()).prop_flat_map(|(names, n)| {
        let names: Vec<&'static str> = names[..n].to_vec();
        (
            Just(names),
            proptest::collection::vec(proptest::collection::vec(value(), n), 0..6),
        )
    })
}

async fn copy_in(c: &tokio_postgres::Client, sql: &str, data: Vec<u8>) -> Result<u64, String> {
    let sink = c.copy_in(sql).await.map_err(|e| format!("{e:?}"))?;
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data))
        .await
        .map_err(|e| format!("{e:?}"))?;
    sink.finish().await.map_err(|e| format!("{e:?}"))
}

#[test]
fn encoded_rows_load_back_exactly_through_copy_from() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::new("csvcopy"));
    let client = rt.block_on(db.client());
    let cols: Vec<String> = NAMES
        .iter()
        .map(|n| format!("{} text", quote_ident(n)))
        .collect();
    rt.block_on(client.batch_execute(&format!(
        "CREATE TABLE t (_n bigserial PRIMARY KEY, {})",
        cols.join(", ")
    )))
    .unwrap();

    let mut runner = TestRunner::new(PtConfig {
        cases: 48,
        failure_persistence: None,
        ..PtConfig::default()
    });
    let checked_rows = std::cell::Cell::new(0usize);
    let result = runner.run(&case(), |(names, rows)| {
        rt.block_on(async {
            client
                .batch_execute("TRUNCATE t RESTART IDENTITY")
                .await
                .unwrap();
            let csv = encode(&names, &rows);
            let list = names
                .iter()
                .map(|n| quote_ident(n))
                .collect::<Vec<_>>()
                .join(", ");
            // HEADER MATCH: PostgreSQL also checks that our header names exactly these columns.
            let n = copy_in(
                &client,
                &format!("COPY t ({list}) FROM STDIN (FORMAT csv, HEADER MATCH, NULL '\\N')"),
                csv.clone(),
            )
            .await
            .map_err(|e| {
                TestCaseError::fail(format!(
                    "COPY FROM rejected {:?}: {e}",
                    String::from_utf8_lossy(&csv)
                ))
            })?;
            prop_assert_eq!(n, rows.len() as u64, "rows loaded");
            let back: Vec<Vec<Option<String>>> = client
                .query(&format!("SELECT {list} FROM t ORDER BY _n"), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (0..names.len()).map(|i| r.get(i)).collect())
                .collect();
            prop_assert_eq!(&back, &rows, "csv was {:?}", String::from_utf8_lossy(&csv));
            checked_rows.set(checked_rows.get() + rows.len());
            Ok(())
        })
    });
    rt.block_on(db.cleanup());
    if let Err(e) = result {
        panic!("{e}");
    }
    let checked_rows = checked_rows.get();
    assert!(
        checked_rows > 48,
        "the property ran on too few rows to mean anything ({checked_rows})"
    );
}

/// Database defaults that differ from the product's session settings: the product's connections must
/// override every one of them.
const HOSTILE_DEFAULTS: &str = "TimeZone = 'America/New_York'; DateStyle = 'SQL, DMY'; \
     IntervalStyle = 'sql_standard'; extra_float_digits = 0; bytea_output = 'escape'";

const TYPES_DDL: &str = r#"
CREATE TYPE pair AS (a integer, b text);
CREATE TABLE kinds (
    id integer PRIMARY KEY,
    c_int int4, c_big int8, c_num numeric(20,6), c_float float8, c_real float4, c_bool boolean,
    c_bytea bytea, c_json json, c_jsonb jsonb, c_int_arr integer[], c_text_arr text[],
    c_ts timestamp, c_tstz timestamptz, c_date date, c_time time, c_interval interval, c_uuid uuid,
    c_text text, c_inet inet, c_range int4range, c_pair pair, c_char char(4), c_bits bit varying(8)
);
INSERT INTO kinds VALUES
 (1, -2147483648, 9223372036854775807, 12345678901234.123456, 1.1, 0.1, true,
  '\x00ff5c22'::bytea, '{"b": 1,   "a": [true, null]}', '{"k": "v\"q", "n": [1, 2.5, null], "u": "é"}',
  '{1,NULL,-3}', '{"a,b","c\"d",NULL,"\\N","",x}',
  '2024-02-29 23:59:59.999999', '2024-02-29 23:59:59.999999+05:30', '0001-01-01 BC', '24:00:00',
  '1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  E'he said "hi",\nnew line\r\nand \\N and \\. ,', '192.168.0.1/24', '[1,10)', ROW(7, 'x "y", z'),
  'ab', B'1011'),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (3, 0, 0, 'NaN', 'NaN', '-Infinity', false, '', '""', '[]', '{}', '{}', 'infinity', '-infinity',
  'infinity', '00:00', '-1 days +00:00:00.000001', '00000000-0000-0000-0000-000000000000', '', '::1',
  'empty', ROW(NULL, ''), '', B''),
 (4, 1, -1, -0.000001, 1e308, 3.4e38, true, '\x'::bytea, '"\\N"', '"\\N"', '{{1,2},{3,4}}',
  '{" lead","trail ","\\\\"}', '2000-01-01', '1970-01-01 00:00:00+00', '2000-01-01', '12:34:56.5',
  '-178000000 years', 'ffffffff-ffff-ffff-ffff-ffffffffffff', E'\\N', '10.0.0.0/8', '(,5]', ROW(1, NULL),
  'abcd', B'11111111'),
 (5, 42, 42, 42, 0.30000000000000004, 1.17549435e-38, false, '\x0a0d', '{"a":"\n"}',
  '{"emoji": "🦀", "esc": "\u0001"}', '{0}', '{"🦀"}', '1999-12-31 23:59:59', '1999-12-31 23:59:59-08',
  '1999-12-31', '23:59:59.999999', '00:00:00', '12345678-1234-1234-1234-123456789abc', ' 🦀 ', '::ffff:1.2.3.4',
  '[-3,-1]', ROW(-1, '🦀'), ' x', B'0');
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_stdout_equals_our_encoding_of_text_values() {
    let db = TestDb::new("csvtypes").await;
    let admin = connect(&pg_base_url()).await;
    admin
        .batch_execute(
            &HOSTILE_DEFAULTS
                .split("; ")
                .map(|s| format!("ALTER DATABASE {} SET {s};", quote_ident(&db.name)))
                .collect::<String>(),
        )
        .await
        .unwrap();
    // A fresh connection through the product's ConnInfo: its startup options must win over the above.
    let c = cdc_egress::pg::conninfo::ConnInfo::parse(&db.url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    c.batch_execute(TYPES_DDL).await.unwrap();
    for (setting, want) in [
        ("TimeZone", "UTC"),
        ("DateStyle", "ISO, MDY"),
        ("IntervalStyle", "postgres"),
        ("extra_float_digits", "3"),
        ("bytea_output", "hex"),
    ] {
        let got: String = c
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap()
            .get(0);
        // DateStyle: only the output style (ISO) matters for values; the field order only affects input.
        if setting == "DateStyle" {
            assert!(
                got.starts_with("ISO,"),
                "DateStyle under ConnInfo::connect: {got}"
            );
        } else {
            assert_eq!(got, want, "{setting} under ConnInfo::connect");
        }
    }

    let names: Vec<String> = c
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = 'kinds'::regclass AND attnum > 0 \
             AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names.len(), 24);

    // PostgreSQL's own CSV.
    let stream = c
        .copy_out(
            "COPY (SELECT * FROM kinds ORDER BY id) TO STDOUT (FORMAT csv, HEADER, NULL '\\N', FORCE_QUOTE *)",
        )
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let theirs: Vec<u8> = chunks.concat();

    // Ours, from the text output of the same values: the simple query protocol returns each value as
    // its type's output function writes it, which is also what pgoutput sends. (A `col::text` cast is
    // *not* the same thing: boolean gives `true` instead of `t`, char(n) loses its padding, inet gains
    // a `/128`; see `text_casts_are_not_the_output_function` below.)
    let rows: Vec<Vec<Option<String>>> = c
        .simple_query("SELECT * FROM kinds ORDER BY id")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..names.len())
                    .map(|i| r.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 5);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let ours = encode(&name_refs, &rows);

    let split = |b: &[u8]| -> (Vec<u8>, Vec<u8>) {
        let nl = b.iter().position(|&x| x == b'\n').expect("a header line");
        (b[..=nl].to_vec(), b[nl + 1..].to_vec())
    };
    let (their_header, their_rows) = split(&theirs);
    let (our_header, our_rows) = split(&ours);
    assert_eq!(
        String::from_utf8_lossy(&our_rows),
        String::from_utf8_lossy(&their_rows),
        "data rows differ from COPY TO's"
    );
    assert_eq!(our_rows, their_rows, "data rows differ byte-wise");
    // Plain names: the header rule agrees with COPY's too.
    assert_eq!(our_header, their_header);

    // The values really are in the product's formats, not the database defaults set above.
    let text = String::from_utf8(theirs).unwrap();
    // Independently of our encoder: a value with quotes, a comma, LF, CRLF, `\N` and `\.` inside.
    assert!(
        text.contains("\"he said \"\"hi\"\",\nnew line\r\nand \\N and \\. ,\""),
        "{text}"
    );
    for value in [
        "2024-02-29 18:29:59.999999+00",
        "2024-02-29 23:59:59.999999",
        r"\x00ff5c22",
        "1 year 2 mons 3 days 04:05:06.789",
        "-1 days +00:00:00.000001",
        "1.1",
        "0.30000000000000004",
        "0001-01-01 BC",
        r#"{"a,b","c\"d",NULL,"\\N","",x}"#,
        r#"(7,"x ""y"", z")"#,
        r"\N",
        "",
    ] {
        let mut field = Vec::new();
        push_value(&mut field, Some(value.as_bytes()));
        let field = String::from_utf8(field).unwrap();
        assert!(text.contains(&field), "COPY output lacks {field}:\n{text}");
    }
    // Row 2 is all NULLs except the id: unquoted \N in every other column.
    assert!(
        text.contains(&format!("\"2\"{}\n", ",\\N".repeat(23))),
        "{text}"
    );
    db.cleanup().await;
}

/// Why the test above fetches values through the simple query protocol: for some types the `::text`
/// cast differs from the output function that COPY and pgoutput use, so an exporter built on
/// `SELECT col::text` would not be byte-identical to the streaming files.
#[tokio::test]
async fn text_casts_are_not_the_output_function() {
    let c = connect(&pg_base_url()).await;
    let sql = "SELECT true, 'ab'::char(4), '::1'::inet";
    let cast: Vec<String> = {
        let r = c
            .query_one(
                "SELECT true::text, 'ab'::char(4)::text, '::1'::inet::text",
                &[],
            )
            .await
            .unwrap();
        (0..3).map(|i| r.get(i)).collect()
    };
    let output: Vec<String> = c
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..3).map(|i| r.get(i).unwrap().to_string()).collect())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(output, ["t", "ab  ", "::1"]);
    assert_eq!(cast, ["true", "ab", "::1/128"]);
}
