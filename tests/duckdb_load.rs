//! The files load losslessly into DuckDB with the options README.md documents.
//!
//! Needs a Python with the `duckdb` package: `CDC_EGRESS_TEST_PYTHON` (set by deploy/test.sh).

mod common;

use std::time::Duration;

use common::*;

fn python() -> String {
    std::env::var("CDC_EGRESS_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CDC_EGRESS_TEST_PYTHON is not set: run the tests with deploy/test.sh (it installs duckdb into a \
             virtualenv), or point it at a python3 that can `import duckdb`"
        )
    })
}

/// Loads a gzipped CSV with the README's DuckDB options and returns every row as strings/None.
fn duckdb_rows(path: &std::path::Path) -> Vec<Vec<Option<String>>> {
    let script = r#"
import duckdb, json, sys
rows = duckdb.sql(r"""SELECT * FROM read_csv(?, header = true, delim = ',', quote = '"', escape = '"',
                      nullstr = '\N', allow_quoted_nulls = false, all_varchar = true)""",
                  params=[sys.argv[1]]).fetchall()
print(json.dumps(rows))
"#;
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "duckdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_files_load_losslessly_into_duckdb() {
    let db = TestDb::new("duckdb").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v text, b bytea, j jsonb, ts timestamptz, n numeric, a text[]);
         CREATE PUBLICATION {} FOR TABLE t;",
        db.publication
    ))
    .await
    .unwrap();
    let env = db.daemon_env(&db.out_url());
    let d = Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    for _ in 0..300 {
        if db.slot_confirmed().await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.batch_execute(
        r#"INSERT INTO t VALUES
          (1, NULL, NULL, NULL, NULL, NULL, NULL),
          (2, '', '\x', '""', '2024-01-01 00:00:00+00', 0, '{}'),
          (3, '\N', '\x5c4e', '"\\N"', 'infinity', 'NaN', '{"\\N",NULL,""}'),
          (4, E'quote " and "" twice, comma, newline\n and CRLF\r\n end', '\x00ff', '{"k": "v\"q"}', '1999-12-31 23:59:59.999999+00', -1.5e-10, '{"a,b","c\"d"}'),
          (5, '  leading and trailing  ', '\x2c22', '[1, "two", null]', '2000-02-29 12:00:00+05:30', 12345678901234567890.123, '{" x "}'),
          (6, 'ünïcødé 🦀 ✓ 中文', '\xe282ac', '{"emoji": "🦀"}', '1970-01-01 00:00:00+00', 1, '{🦀}'),
          (7, 'back\slash \\ and \t tab', '\x09', 'true', NULL, NULL, '{NULL}');"#,
    )
    .await
    .unwrap();
    db.wait_caught_up(Duration::from_secs(60)).await;
    assert!(d.stop().await.success());

    // PostgreSQL's own text output of every value (the simple query protocol returns the type's
    // output function, under the product's session settings).
    let expected: Vec<Vec<Option<String>>> = c
        .simple_query("SELECT id, v, b, j, ts, n, a FROM t ORDER BY id")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..7).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(expected.len(), 7);

    let path: String = c
        .query_one(
            "SELECT object_path FROM cdc_egress.files WHERE kind = 'streaming' ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let file = db.dir.path().join("out").join(&path);
    let mut rows = duckdb_rows(&file);
    rows.sort_by_key(|r| r[7].as_ref().map(|s| s.parse::<i32>().unwrap()));
    let got: Vec<Vec<Option<String>>> = rows.into_iter().map(|r| r[7..].to_vec()).collect();
    assert_eq!(
        got, expected,
        "DuckDB read different values than PostgreSQL wrote"
    );
    // The distinction that loaders most often lose: NULL vs '' vs the string \N.
    assert_eq!(got[0][1], None);
    assert_eq!(got[1][1].as_deref(), Some(""));
    assert_eq!(got[2][1].as_deref(), Some("\\N"));
    db.cleanup().await;
}

/// README "Schema changes": the DuckDB statements it gives for applying a rename, an added column
/// and a type change run as written, and keep the rows.
#[test]
fn the_readme_schema_change_statements_run_in_duckdb() {
    let script = r#"
import duckdb, json
c = duckdb.connect()
c.execute("CREATE TABLE t (id INTEGER, a VARCHAR, n DECIMAL(10,2))")
c.execute("INSERT INTO t VALUES (1, 'x', 1.25)")
c.execute("ALTER TABLE t RENAME COLUMN a TO b; ALTER TABLE t ADD COLUMN d INTEGER;")
c.execute("ALTER TABLE t ALTER n TYPE DECIMAL(10,1)")
print(json.dumps([[str(v) if v is not None else None for v in r] for r in c.execute("SELECT id, b, n, d FROM t").fetchall()]))
"#;
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<Option<String>>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows,
        vec![vec![
            Some("1".to_string()),
            Some("x".to_string()),
            Some("1.3".to_string()),
            None
        ]]
    );
}
