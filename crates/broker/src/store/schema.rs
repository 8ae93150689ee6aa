//! The tables of the SQL stores, written once and rendered for SQLite or PostgreSQL.

/// Which SQL the schema is rendered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A column type, spelled per dialect.
#[derive(Clone, Copy)]
enum Ty {
    /// The row's position: a growing integer key.
    Serial,
    Text,
    /// A 32-bit integer.
    Int,
    /// Unix ms and other 64-bit integers.
    Big,
    Flag,
    /// The labels a task needs: a JSON array in SQLite, `TEXT[]` in PostgreSQL.
    Labels,
    /// A JSON object: text in SQLite, `JSONB` in PostgreSQL.
    Json,
}

impl Ty {
    fn sql(self, d: Dialect) -> &'static str {
        use Dialect::*;
        match (self, d) {
            // Without AUTOINCREMENT: rows are never deleted, so the rowid grows all the same,
            // and no `sqlite_sequence` row is written with every insert.
            (Ty::Serial, Sqlite) => "INTEGER PRIMARY KEY",
            (Ty::Serial, Postgres) => "BIGSERIAL PRIMARY KEY",
            (Ty::Text, _) => "TEXT",
            (Ty::Int, _) => "INTEGER",
            (Ty::Big, Sqlite) => "INTEGER",
            (Ty::Big, Postgres) => "BIGINT",
            (Ty::Flag, Sqlite) => "INTEGER",
            (Ty::Flag, Postgres) => "BOOLEAN",
            (Ty::Labels, Sqlite) => "TEXT",
            (Ty::Labels, Postgres) => "TEXT[] NOT NULL DEFAULT '{}'",
            (Ty::Json, Sqlite) => "TEXT",
            (Ty::Json, Postgres) => "JSONB",
        }
    }

    /// `NOT NULL DEFAULT` of a flag or counter, per dialect.
    fn zero(self, d: Dialect) -> &'static str {
        match (self, d) {
            (Ty::Flag, Dialect::Postgres) => " NOT NULL DEFAULT FALSE",
            _ => " NOT NULL DEFAULT 0",
        }
    }
}

/// A column's constraint: how it may be empty.
#[derive(Clone, Copy)]
enum Cons {
    /// May be NULL.
    Nullable,
    /// `NOT NULL`.
    NotNull,
    /// `NOT NULL DEFAULT 0` (false for flags).
    Zero,
    /// `NOT NULL UNIQUE`.
    Unique,
    /// `UNIQUE`, may be NULL.
    UniqueNullable,
}

type Col = (&'static str, Ty, Cons);

struct Table {
    name: &'static str,
    cols: &'static [Col],
    key: Option<&'static str>,
}

const TASKS: &[Col] = &[
    ("seq", Ty::Serial, Cons::NotNull),
    ("id", Ty::Text, Cons::Unique),
    ("request_id", Ty::Text, Cons::UniqueNullable),
    ("task_type", Ty::Text, Cons::NotNull),
    ("state", Ty::Text, Cons::NotNull),
    ("priority", Ty::Int, Cons::NotNull),
    ("input", Ty::Text, Cons::NotNull),
    ("metadata", Ty::Text, Cons::Nullable),
    ("attempt", Ty::Int, Cons::Zero),
    ("max_attempts", Ty::Int, Cons::NotNull),
    ("lease", Ty::Text, Cons::UniqueNullable),
    ("worker_id", Ty::Text, Cons::Nullable),
    ("lease_expires_at", Ty::Big, Cons::Nullable),
    ("deadline", Ty::Big, Cons::Nullable),
    ("not_before", Ty::Big, Cons::Zero),
    ("cancel_requested", Ty::Flag, Cons::Zero),
    ("output", Ty::Text, Cons::Nullable),
    ("error", Ty::Text, Cons::Nullable),
    ("progress", Ty::Text, Cons::Nullable),
    ("dead_lettered", Ty::Flag, Cons::Zero),
    ("created_at", Ty::Big, Cons::NotNull),
    ("started_at", Ty::Big, Cons::Nullable),
    ("completed_at", Ty::Big, Cons::Nullable),
];

/// Task columns added after the first release, added to databases made before them when
/// a store opens: `model` (the model a worker must list; NULL: any), `labels` (the labels
/// a worker must have) and `assign_failures` (assignments of the current attempt that
/// failed on the transport in a row).
const ADDED: &[Col] = &[
    ("model", Ty::Text, Cons::Nullable),
    ("labels", Ty::Labels, Cons::Nullable),
    ("assign_failures", Ty::Int, Cons::Zero),
    // The task's webhook URL and the events it receives (see `crate::outbox`).
    ("webhook", Ty::Text, Cons::Nullable),
    ("webhook_events", Ty::Labels, Cons::Nullable),
];

const TABLES: &[Table] = &[
    Table {
        name: "attempts",
        cols: &[
            ("task_id", Ty::Text, Cons::NotNull),
            ("attempt", Ty::Int, Cons::NotNull),
            ("worker_id", Ty::Text, Cons::NotNull),
            ("lease", Ty::Text, Cons::NotNull),
            ("started_at", Ty::Big, Cons::NotNull),
            ("ended_at", Ty::Big, Cons::Nullable),
            ("error", Ty::Text, Cons::Nullable),
        ],
        key: Some("task_id, attempt"),
    },
    Table {
        name: "events",
        cols: &[
            ("id", Ty::Serial, Cons::NotNull),
            ("task_id", Ty::Text, Cons::NotNull),
            ("kind", Ty::Text, Cons::NotNull),
            ("data", Ty::Text, Cons::NotNull),
            ("ts", Ty::Big, Cons::NotNull),
        ],
        key: None,
    },
    // Stage timings: one JSON object per task.
    Table {
        name: "timings",
        cols: &[
            ("task_id", Ty::Text, Cons::NotNull),
            ("data", Ty::Json, Cons::NotNull),
        ],
        key: Some("task_id"),
    },
    // Workers a task skips after their retryable reject, until `until`.
    Table {
        name: "avoid",
        cols: &[
            ("task_id", Ty::Text, Cons::NotNull),
            ("worker_id", Ty::Text, Cons::NotNull),
            ("until", Ty::Big, Cons::NotNull),
        ],
        key: Some("task_id, worker_id"),
    },
    // Task types workers said hello with, and when last.
    Table {
        name: "task_types",
        cols: &[
            ("task_type", Ty::Text, Cons::NotNull),
            ("last_seen", Ty::Big, Cons::NotNull),
        ],
        key: Some("task_type"),
    },
    // The webhook outbox (`crate::outbox`): messages, their attempts, disabled URLs.
    Table {
        name: "webhook_messages",
        cols: &[
            ("seq", Ty::Serial, Cons::NotNull),
            ("id", Ty::Text, Cons::Unique),
            ("task_id", Ty::Text, Cons::Nullable),
            ("url", Ty::Text, Cons::NotNull),
            ("event", Ty::Text, Cons::NotNull),
            ("payload", Ty::Text, Cons::NotNull),
            ("body", Ty::Text, Cons::Nullable),
            ("state", Ty::Text, Cons::NotNull),
            ("attempts", Ty::Int, Cons::Zero),
            ("next_at", Ty::Big, Cons::NotNull),
            ("lease_holder", Ty::Text, Cons::Nullable),
            ("lease_until", Ty::Big, Cons::Nullable),
            ("created_at", Ty::Big, Cons::NotNull),
        ],
        key: None,
    },
    Table {
        name: "webhook_attempts",
        cols: &[
            ("message_id", Ty::Text, Cons::NotNull),
            ("attempt", Ty::Int, Cons::NotNull),
            ("at", Ty::Big, Cons::NotNull),
            ("status", Ty::Int, Cons::Nullable),
            ("latency_ms", Ty::Big, Cons::NotNull),
            ("error", Ty::Text, Cons::Nullable),
        ],
        key: Some("message_id, attempt"),
    },
    Table {
        name: "webhook_disabled",
        cols: &[
            ("url", Ty::Text, Cons::NotNull),
            ("at", Ty::Big, Cons::NotNull),
        ],
        key: Some("url"),
    },
    Table {
        name: "workers",
        cols: &[
            ("worker_id", Ty::Text, Cons::NotNull),
            ("secret_sha256", Ty::Text, Cons::NotNull),
            ("created_at", Ty::Big, Cons::NotNull),
        ],
        key: Some("worker_id"),
    },
];

/// `(name, table and columns, where, PostgreSQL only)`.
const INDEXES: &[(&str, &str, &str, bool)] = &[
    (
        "tasks_ready",
        "tasks (task_type, priority DESC, seq)",
        "state = 'queued'",
        false,
    ),
    (
        "tasks_running",
        "tasks (lease_expires_at)",
        "state = 'running'",
        false,
    ),
    (
        "tasks_worker",
        "tasks (worker_id)",
        "state = 'running'",
        false,
    ),
    (
        "tasks_deadline",
        "tasks (deadline)",
        "state IN ('queued', 'running') AND deadline IS NOT NULL",
        true,
    ),
    ("events_task", "events (task_id, id)", "", false),
    (
        "webhook_due",
        "webhook_messages (next_at, seq)",
        "state = 'pending'",
        false,
    ),
    ("webhook_task", "webhook_messages (task_id, seq)", "", false),
    ("attempts_lease", "attempts (lease)", "", true),
];

fn column(c: &Col, d: Dialect) -> String {
    let (name, ty, null) = *c;
    let rest = match null {
        Cons::Nullable => String::new(),
        Cons::NotNull => " NOT NULL".into(),
        Cons::Zero => ty.zero(d).into(),
        Cons::Unique => " NOT NULL UNIQUE".into(),
        Cons::UniqueNullable => " UNIQUE".into(),
    };
    let ty = ty.sql(d);
    if ty.contains("NOT NULL") || ty.contains("PRIMARY KEY") {
        format!("    {name} {ty}")
    } else {
        format!("    {name} {ty}{rest}")
    }
}

fn create(name: &str, cols: &[String], key: Option<&str>, prefix: &str) -> String {
    let mut lines = cols.to_vec();
    if let Some(k) = key {
        lines.push(format!("    PRIMARY KEY ({k})"));
    }
    format!(
        "CREATE TABLE IF NOT EXISTS {prefix}{name} (\n{}\n);\n",
        lines.join(",\n")
    )
}

/// The statements that create every table and index (idempotently), tables named with
/// `prefix` (`""`, or `"schema."`). PostgreSQL also adds the columns of later releases
/// (`ADD COLUMN IF NOT EXISTS`); SQLite lacks that, so its store adds them with
/// [`added_columns`] after looking.
pub(crate) fn schema_sql(d: Dialect, prefix: &str) -> String {
    let mut sql = String::new();
    let mut task_cols: Vec<String> = TASKS.iter().map(|c| column(c, d)).collect();
    task_cols.extend(ADDED.iter().map(|c| column(c, d)));
    sql += &create("tasks", &task_cols, None, prefix);
    if d == Dialect::Postgres {
        for c in ADDED {
            sql += &format!(
                "ALTER TABLE {prefix}tasks ADD COLUMN IF NOT EXISTS {};\n",
                column(c, d).trim_start()
            );
        }
    }
    for t in TABLES {
        let cols: Vec<String> = t.cols.iter().map(|c| column(c, d)).collect();
        sql += &create(t.name, &cols, t.key, prefix);
    }
    for (name, on, filter, pg_only) in INDEXES {
        if *pg_only && d != Dialect::Postgres {
            continue;
        }
        let filter = if filter.is_empty() {
            String::new()
        } else {
            format!(" WHERE {filter}")
        };
        sql += &format!("CREATE INDEX IF NOT EXISTS {name} ON {prefix}{on}{filter};\n");
    }
    sql
}

/// The columns of later releases: `(name, type and constraints)` in dialect `d`.
pub(crate) fn added_columns(d: Dialect) -> Vec<(&'static str, String)> {
    ADDED
        .iter()
        .map(|c| {
            (
                c.0,
                column(c, d)
                    .trim_start()
                    .trim_start_matches(c.0)
                    .trim()
                    .to_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_dialects_render_the_tables() {
        let lite = schema_sql(Dialect::Sqlite, "");
        assert!(lite.contains("seq INTEGER PRIMARY KEY,"));
        assert!(!lite.contains("AUTOINCREMENT"));
        assert!(lite.contains("cancel_requested INTEGER NOT NULL DEFAULT 0"));
        assert!(!lite.contains("tasks_deadline"));
        let pg = schema_sql(Dialect::Postgres, "k.");
        assert!(pg.contains("CREATE TABLE IF NOT EXISTS k.tasks"));
        assert!(pg.contains("cancel_requested BOOLEAN NOT NULL DEFAULT FALSE"));
        assert!(pg.contains("labels TEXT[] NOT NULL DEFAULT '{}'"));
        assert!(pg.contains("ALTER TABLE k.tasks ADD COLUMN IF NOT EXISTS labels TEXT[]"));
        assert!(pg.contains("data JSONB NOT NULL"));
        assert_eq!(
            added_columns(Dialect::Sqlite)[2],
            ("assign_failures", "INTEGER NOT NULL DEFAULT 0".to_owned())
        );
    }
}
