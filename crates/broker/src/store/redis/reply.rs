//! Reading the script's replies: Redis values, task hashes and events.

use std::collections::HashMap;

use ::redis::Value;

use super::corrupt;
use crate::lifecycle::TaskEvent;
use crate::model::*;
use crate::store::{COLUMNS, Columns, Result, parse_json, task_from_row};

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(corrupt("expected an array")),
    }
}

pub(super) fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(n) => Ok(*n),
        other => text(other)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("expected an integer")),
    }
}

/// A task hash, cells by the column names.
struct Hash(HashMap<String, String>);

impl Columns for Hash {
    fn text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.0.get(COLUMNS[i]).cloned())
    }
    fn int(&self, i: usize) -> Result<Option<i64>> {
        self.0
            .get(COLUMNS[i])
            .map(|s| {
                s.parse().map_err(|_| {
                    QueueError::Corrupt(format!("{} is not a number: {s:?}", COLUMNS[i]))
                })
            })
            .transpose()
    }
    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.0.get(COLUMNS[i]).is_some_and(|v| v == "1"))
    }
    fn list(&self, i: usize) -> Result<Vec<String>> {
        Ok(parse_json(self.0.get(COLUMNS[i]).cloned())?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| QueueError::Corrupt(format!("labels: {e}")))?
            .unwrap_or_default())
    }
}

/// A task from the flat field/value array of `HGETALL`; `None` when empty.
pub(super) fn task_from(v: Value) -> Result<Option<Task>> {
    let items = array(v)?;
    if items.is_empty() {
        return Ok(None);
    }
    let mut h = HashMap::with_capacity(items.len() / 2);
    let mut it = items.iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Some(k), Some(v)) = (text(k), text(v)) {
            h.insert(k, v);
        }
    }
    task_from_row(&Hash(h)).map(Some)
}

pub(super) fn need_task(v: Option<Value>) -> Result<Task> {
    task_from(v.ok_or_else(|| corrupt("missing task"))?)?.ok_or_else(|| corrupt("task vanished"))
}

pub(super) fn tasks_from(v: Value) -> Result<Vec<Task>> {
    array(v)?
        .into_iter()
        .filter_map(|t| task_from(t).transpose())
        .collect()
}

pub(super) fn event_from(s: &str) -> Result<TaskEvent> {
    serde_json::from_str(s).map_err(|e| QueueError::Corrupt(format!("event: {e}")))
}

/// The fields of one reply, in order.
pub(super) struct Reply(pub(super) std::vec::IntoIter<Value>);

impl Reply {
    pub(super) fn next(&mut self) -> Option<Value> {
        self.0.next()
    }
    pub(super) fn tag(&mut self) -> Result<String> {
        self.0
            .next()
            .as_ref()
            .and_then(text)
            .ok_or_else(|| corrupt("missing tag"))
    }
}
