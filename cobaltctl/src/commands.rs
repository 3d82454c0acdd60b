//! The verbs. Each returns the process exit code; errors bubble up as `anyhow` with the message
//! a user needs.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use crate::client::{Client, CtlError, Listed};
use crate::kinds::Kind;
use crate::manifests;
use crate::merge::{comparable, desired, unchanged, LAST_APPLIED};
use crate::output::{self, Format};

/// Bound on conflict retries of one apply (another writer changed the object in between).
const APPLY_RETRIES: usize = 5;

/// Default number of requests `apply` and `diff` keep in flight (`--parallel`).
pub const DEFAULT_PARALLEL: usize = 16;

/// From this many objects of one kind, `apply` and `diff` read what the server holds with one
/// list of the kind instead of one GET per object (a GitOps repository re-applied unchanged
/// then costs one request per kind and no write). Below it, a list of a large cluster would
/// cost more than the GETs.
const LIST_FROM: usize = 8;

/// The order in which kinds are applied: a Snapshot names a Volume the server wants to exist
/// first; Claims may bind Volumes of the same apply. Within a kind, requests run in parallel.
const APPLY_ORDER: [Kind; 4] = [Kind::Machine, Kind::Volume, Kind::Snapshot, Kind::Claim];

/// What the server held of the objects about to be applied, read once per kind where there
/// are many of them. An object of a kind that was not listed is read with its own GET.
struct Live {
    listed: HashMap<Kind, Known>,
}

/// One kind's list, and the objects of the files it holds, decoded.
struct Known {
    list: Listed,
    decoded: HashMap<String, Value>,
}

impl Live {
    /// Reads the manifests of `files` and, while they are parsed, lists each kind as soon as
    /// the files hold [`LIST_FROM`] objects of it (a GitOps repository's list arrives while its
    /// files are still being read). A manifest error wins over a failed list: nothing is
    /// written either way. Of each list, only the objects the files name are decoded.
    async fn load(
        c: &Client,
        files: &[String],
        recursive: bool,
    ) -> anyhow::Result<(Vec<manifests::Object>, Live)> {
        use futures::StreamExt;
        let (tx, mut kinds) = tokio::sync::mpsc::unbounded_channel::<Kind>();
        let files = files.to_vec();
        let mut loading = tokio::task::spawn_blocking(move || {
            let mut counts: HashMap<Kind, usize> = HashMap::new();
            manifests::load_each(&files, recursive, |o| {
                let n = counts.entry(o.kind).or_default();
                *n += 1;
                if *n == LIST_FROM {
                    let _ = tx.send(o.kind);
                }
            })
        });
        let list = |kind: Kind| async move { (kind, c.list_by_name(kind).await) };
        let mut lists = futures::stream::FuturesUnordered::new();
        let mut listed = HashMap::new();
        let mut list_error = None;
        let mut record = |kind: Kind, result: Result<Listed, CtlError>| match result {
            Ok(list) => {
                listed.insert(kind, list);
            }
            Err(e) => {
                list_error.get_or_insert(e);
            }
        };
        let objects = loop {
            tokio::select! {
                Some(kind) = kinds.recv() => lists.push(list(kind)),
                Some((kind, result)) = lists.next(), if !lists.is_empty() => record(kind, result),
                loaded = &mut loading => break loaded??,
            }
        };
        while let Ok(kind) = kinds.try_recv() {
            lists.push(list(kind));
        }
        while let Some((kind, result)) = lists.next().await {
            record(kind, result);
        }
        if let Some(e) = list_error {
            return Err(e.into());
        }
        let mut known = HashMap::new();
        for (kind, list) in listed {
            let names: Vec<&str> = objects
                .iter()
                .filter(|o| o.kind == kind)
                .map(|o| o.name.as_str())
                .collect();
            let decoded = list.decode(&names)?;
            known.insert(kind, Known { list, decoded });
        }
        Ok((objects, Live { listed: known }))
    }

    /// `Some(live)` when the kind was listed (`Some(None)`: the server has no such object);
    /// `None` when the object must be read on its own.
    fn of(&self, o: &manifests::Object) -> Option<Option<&Value>> {
        self.listed.get(&o.kind).map(|k| k.decoded.get(&o.name))
    }

    async fn get<'a>(
        &'a self,
        c: &Client,
        o: &manifests::Object,
    ) -> anyhow::Result<Option<std::borrow::Cow<'a, Value>>> {
        use std::borrow::Cow;
        match self.of(o) {
            Some(known) => Ok(known.map(Cow::Borrowed)),
            None => Ok(c.get(o.kind, &o.name).await?.map(Cow::Owned)),
        }
    }
}

/// Runs `work` over `items` with at most `parallel` in flight, yielding results in the order
/// of `items` (so output reads like the manifests).
fn in_order<'a, T, F, Fut, R>(
    items: &'a [T],
    parallel: usize,
    work: F,
) -> impl futures::Stream<Item = (&'a T, R)> + 'a
where
    F: Fn(&'a T) -> Fut + 'a,
    Fut: std::future::Future<Output = R> + 'a,
    R: 'a,
{
    use futures::StreamExt;
    futures::stream::iter(items)
        .map(move |item| {
            let fut = work(item);
            async move { (item, fut.await) }
        })
        .buffered(parallel.max(1))
}

/// True when an apply error is about the object (the server answered), so the other objects
/// are still worth applying; false when the server could not be reached at all.
fn about_the_object(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<CtlError>(), Some(CtlError::Api(_)))
}

pub async fn apply(
    c: &Client,
    files: &[String],
    recursive: bool,
    dry_run: bool,
    prune: Option<&str>,
    parallel: usize,
) -> anyhow::Result<i32> {
    use futures::StreamExt;
    let (objects, live) = Live::load(c, files, recursive).await?;
    if objects.is_empty() {
        anyhow::bail!("no objects found in {}", files.join(", "));
    }
    let suffix = if dry_run { " (server dry run)" } else { "" };
    let mut failed = 0usize;
    for kind in APPLY_ORDER {
        let batch: Vec<&manifests::Object> = objects.iter().filter(|o| o.kind == kind).collect();
        let mut results = std::pin::pin!(in_order(&batch, parallel, |o| {
            apply_one(c, o, dry_run, live.of(o))
        }));
        while let Some((o, result)) = results.next().await {
            match result {
                Ok(verb) => println!("{}/{} {verb}{suffix}", o.kind.singular(), o.name),
                Err(e) if about_the_object(&e) => {
                    eprintln!("error: {}/{}: {e:#}", o.kind.singular(), o.name);
                    failed += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
    if failed > 0 {
        let pruning = if prune.is_some() {
            "; nothing was pruned"
        } else {
            ""
        };
        anyhow::bail!(
            "{failed} of {} objects were not applied{pruning}",
            objects.len()
        );
    }
    if let Some(selector) = prune {
        prune_leftovers(c, &objects, &live, selector, dry_run, parallel).await?;
    }
    leave_to_exit((objects, live));
    Ok(0)
}

/// Leaves `parsed` for the process's exit to free: cobaltctl exits right after a verb, and
/// freeing a repository's worth of parsed manifests and listed objects one allocation at a
/// time took longer than comparing them (0.18 s of a 1.9 s re-apply of 10,000 manifests).
fn leave_to_exit<T>(parsed: T) {
    std::mem::forget(parsed);
}

/// `--prune -l SELECTOR`: deletes objects that carry the selector's labels and apply's
/// annotation (apply made them) but are in none of the applied files. A kind apply listed is
/// filtered here instead of being listed again.
async fn prune_leftovers(
    c: &Client,
    objects: &[manifests::Object],
    live: &Live,
    selector: &str,
    dry_run: bool,
    parallel: usize,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let parsed: cobalt_api::selector::LabelSelector = selector
        .parse()
        .map_err(|e| anyhow::anyhow!("-l/--selector: {e}"))?;
    let applied: HashSet<(Kind, &str)> =
        objects.iter().map(|o| (o.kind, o.name.as_str())).collect();
    let suffix = if dry_run { " (server dry run)" } else { "" };
    let annotation = format!("/metadata/annotations/{}", LAST_APPLIED.replace('/', "~1"));
    for kind in [Kind::Volume, Kind::Machine, Kind::Snapshot, Kind::Claim] {
        let mut leftovers: Vec<String> = match live.listed.get(&kind) {
            Some(known) => applied_by(&known.list, &parsed)?,
            None => {
                let list = c.list(kind, Some(selector)).await?;
                list["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|item| item.pointer(&annotation).is_some())
                    .filter_map(|item| Some(item.pointer("/metadata/name")?.as_str()?.to_string()))
                    .collect()
            }
        };
        leftovers.retain(|name| !applied.contains(&(kind, name.as_str())));
        leftovers.sort();
        let mut results = std::pin::pin!(in_order(&leftovers, parallel, |name| async move {
            if dry_run {
                return Ok(());
            }
            match c.delete(kind, name).await {
                Err(CtlError::Api(f)) if f.code == StatusCode::NOT_FOUND => Ok(()),
                other => other.map(|_| ()),
            }
        }));
        while let Some((name, result)) = results.next().await {
            result?;
            println!("{}/{name} pruned{suffix}", kind.singular());
        }
    }
    Ok(())
}

/// The names of the listed objects that carry the labels `selector` asks for and apply's
/// annotation, read without decoding the rest of each object (on every core).
fn applied_by(
    list: &Listed,
    selector: &cobalt_api::selector::LabelSelector,
) -> anyhow::Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Item<'a> {
        #[serde(borrow)]
        metadata: Meta<'a>,
    }
    #[derive(Deserialize)]
    struct Meta<'a> {
        #[serde(borrow)]
        name: std::borrow::Cow<'a, str>,
        #[serde(default)]
        labels: cobalt_api::StringMap,
        #[serde(default)]
        annotations: Annotations,
    }
    /// Only whether apply's annotation is there: the rest is skipped, nothing is kept.
    #[derive(Default, Deserialize)]
    struct Annotations {
        #[serde(rename = "cobalt.io/last-applied")]
        last_applied: Option<serde::de::IgnoredAny>,
    }
    let items: Vec<(&str, &str)> = list.raw().collect();
    let pick = |items: &[(&str, &str)]| {
        let mut names = Vec::new();
        for (_, json) in items {
            let item: Item = serde_json::from_str(json)?;
            let m = item.metadata;
            if m.annotations.last_applied.is_some() && selector.matches(&m.labels) {
                names.push(m.name.into_owned());
            }
        }
        Ok::<_, serde_json::Error>(names)
    };
    let mut names = Vec::new();
    for part in crate::client::on_every_core(&items, pick) {
        names.extend(part.map_err(|e| anyhow::anyhow!("the server's list is not valid: {e}"))?);
    }
    Ok(names)
}

/// Applies one object. `known` is what a list read of the kind said the server holds
/// (`Some(None)`: absent); it is used for the first attempt only: a conflict or a lost create
/// race re-reads the object on its own.
pub(crate) async fn apply_one(
    c: &Client,
    o: &manifests::Object,
    dry_run: bool,
    mut known: Option<Option<&Value>>,
) -> anyhow::Result<&'static str> {
    for _ in 0..APPLY_RETRIES {
        let fetched: Option<Value>;
        let live = match known.take() {
            Some(live) => live,
            None => {
                fetched = c.get(o.kind, &o.name).await?;
                fetched.as_ref()
            }
        };
        let Some(live) = live else {
            let body = desired(&serde_json::json!({}), &o.manifest.value);
            match c.create(o.kind, &body, dry_run).await {
                Ok(_) => return Ok("created"),
                Err(CtlError::Api(f)) if f.reason == "AlreadyExists" => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if unchanged(live, &o.manifest) {
            return Ok("unchanged");
        }
        let want = desired(live, &o.manifest.value);
        if comparable(&want) == comparable(live) {
            return Ok("unchanged");
        }
        match c.replace(o.kind, &o.name, &want, dry_run).await {
            Ok(_) => return Ok("configured"),
            Err(CtlError::Api(f)) if f.reason == "Conflict" => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!(
        "{}/{}: kept changing while applying; try again",
        o.kind.singular(),
        o.name
    )
}

pub async fn get(
    c: &Client,
    what: &str,
    name: Option<String>,
    format: Option<Format>,
    selector: Option<&str>,
    watch: bool,
) -> anyhow::Result<i32> {
    let (kind, from_ref) = Kind::parse_ref(what).map_err(anyhow::Error::msg)?;
    let name = name.or(from_ref);
    let wide = format == Some(Format::Wide);
    let (items, resource_version) = match &name {
        Some(n) => match c.get(kind, n).await? {
            Some(v) => (vec![v.clone()], None),
            None => anyhow::bail!("{} {n:?} not found", kind.singular()),
        },
        None => {
            let list = c.list(kind, selector).await?;
            let rv = list
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string);
            (list["items"].as_array().cloned().unwrap_or_default(), rv)
        }
    };
    match format {
        Some(Format::Json) => match &name {
            Some(_) => println!("{}", serde_json::to_string_pretty(&items[0])?),
            None => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"kind": "List", "items": items}))?
            ),
        },
        Some(Format::Yaml) => match &name {
            Some(_) => print!("{}", output::yaml(&items[0])),
            None => print!(
                "{}",
                output::yaml(&serde_json::json!({"kind": "List", "items": items}))
            ),
        },
        Some(Format::Name) => {
            for i in &items {
                println!(
                    "{}/{}",
                    kind.singular(),
                    i["metadata"]["name"].as_str().unwrap_or_default()
                );
            }
        }
        _ => {
            if items.is_empty() && !watch {
                eprintln!("No {} found.", kind.plural());
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = items.iter().map(|v| output::row(kind, v, wide)).collect();
            print!("{}", output::table(&output::header(kind, wide), &rows));
        }
    }
    if !watch {
        return Ok(0);
    }
    let rv = match resource_version {
        Some(rv) => Some(rv),
        None => c
            .list(kind, None)
            .await?
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    let mut stream = c.watch(kind, rv.as_deref(), selector).await?;
    while let Some(event) = stream.next().await? {
        let t = event["type"].as_str().unwrap_or_default();
        if t == "BOOKMARK" {
            continue;
        }
        if t == "ERROR" {
            anyhow::bail!(
                "watch ended: {}",
                event["object"]["message"].as_str().unwrap_or("error")
            );
        }
        let obj = &event["object"];
        if name
            .as_deref()
            .is_some_and(|n| obj["metadata"]["name"] != n)
        {
            continue;
        }
        match format {
            Some(Format::Json) => println!("{}", serde_json::to_string(&event)?),
            Some(Format::Yaml) => print!("---\n{}", output::yaml(&event)),
            Some(Format::Name) => println!(
                "{}/{}",
                kind.singular(),
                obj["metadata"]["name"].as_str().unwrap_or_default()
            ),
            _ => {
                let mut r = output::row(kind, obj, wide);
                if t == "DELETED" {
                    r[3] = "Deleted".into();
                }
                let table = output::table(&output::header(kind, wide), &[r]);
                println!("{}", table.lines().nth(1).unwrap_or_default());
            }
        }
    }
    Ok(0)
}

pub async fn describe(c: &Client, what: &str, name: Option<String>) -> anyhow::Result<i32> {
    let (kind, from_ref) = Kind::parse_ref(what).map_err(anyhow::Error::msg)?;
    let names: Vec<String> = match name.or(from_ref) {
        Some(n) => vec![n],
        None => c.list(kind, None).await?["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
            .collect(),
    };
    for (i, n) in names.iter().enumerate() {
        let v = c
            .get(kind, n)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{} {n:?} not found", kind.singular()))?;
        if i > 0 {
            println!();
        }
        print!("{}", output::describe(kind, &v));
        // The last few events of this very object (by uid: not those of an earlier namesake).
        let selector = format!(
            "involvedObject.kind={},involvedObject.name={n},involvedObject.uid={}",
            kind.kind(),
            v.pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("")
        );
        match c.events(&selector).await {
            Ok(list) => print!("{}", output::describe_events(&list, DESCRIBE_EVENTS)),
            Err(e) => println!("Events:         <cannot be read: {e}>"),
        }
    }
    Ok(0)
}

/// How many events `describe` shows (the most recent).
const DESCRIBE_EVENTS: usize = 10;

/// `cobaltctl events [kind[/name]] [--warnings]`.
pub async fn events(
    c: &Client,
    what: Option<&str>,
    name: Option<String>,
    warnings: bool,
    format: Option<Format>,
) -> anyhow::Result<i32> {
    let mut terms = Vec::new();
    if let Some(what) = what {
        let (kind, from_ref) = Kind::parse_ref(what).map_err(anyhow::Error::msg)?;
        terms.push(format!("involvedObject.kind={}", kind.kind()));
        if let Some(n) = name.or(from_ref) {
            terms.push(format!("involvedObject.name={n}"));
        }
    }
    if warnings {
        terms.push("type=Warning".into());
    }
    let list = c.events(&terms.join(",")).await?;
    match format {
        Some(Format::Json) => println!("{}", serde_json::to_string_pretty(&list)?),
        Some(Format::Yaml) => print!("{}", output::yaml(&list)),
        Some(Format::Name) => {
            for e in list["items"].as_array().into_iter().flatten() {
                println!("event/{}", e["metadata"]["name"].as_str().unwrap_or(""));
            }
        }
        None | Some(Format::Wide) => {
            let items = list["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                eprintln!("No events found.");
            } else {
                print!("{}", output::event_table(&items));
            }
        }
    }
    Ok(0)
}

pub struct DeleteOptions {
    /// Wait until the objects are gone.
    pub wait: bool,
    /// Delete a volume's snapshots first.
    pub with_snapshots: bool,
    pub timeout: Duration,
}

pub async fn delete(
    c: &Client,
    what: Option<&str>,
    name: Option<String>,
    files: &[String],
    opts: DeleteOptions,
) -> anyhow::Result<i32> {
    let mut targets: Vec<(Kind, String)> = Vec::new();
    if !files.is_empty() {
        for o in manifests::load(files, false)? {
            targets.push((o.kind, o.name));
        }
    } else {
        let what = what.ok_or_else(|| {
            anyhow::anyhow!("say what to delete: `delete volume NAME` or `delete -f FILE`")
        })?;
        let (kind, from_ref) = Kind::parse_ref(what).map_err(anyhow::Error::msg)?;
        let n = name
            .or(from_ref)
            .ok_or_else(|| anyhow::anyhow!("say which {} to delete", kind.singular()))?;
        targets.push((kind, n));
    }
    for (kind, n) in &targets {
        let result = if *kind == Kind::Volume && opts.with_snapshots {
            delete_volume_with_snapshots(c, n, opts.timeout).await
        } else {
            c.delete(*kind, n).await.map_err(Into::into)
        };
        match result {
            Ok(_) => println!("{}/{n} deleted", kind.singular()),
            Err(e) => match e.downcast_ref::<CtlError>() {
                Some(CtlError::Api(f)) if f.reason == "NotFound" => {
                    anyhow::bail!("{} {n:?} not found", kind.singular())
                }
                _ => return Err(e),
            },
        }
    }
    if opts.wait {
        for (kind, n) in &targets {
            wait_for(c, *kind, n, &WaitFor::Delete, opts.timeout).await?;
        }
    }
    Ok(0)
}

/// Deletes every Snapshot of volume `name`, waits until they are gone (their data freed), then
/// deletes the volume. A schedule may take a new snapshot in between: the volume's delete is then
/// refused (409) and the round is repeated, a bounded number of times.
async fn delete_volume_with_snapshots(
    c: &Client,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    const ROUNDS: usize = 3;
    for round in 1..=ROUNDS {
        let list = c.list(Kind::Snapshot, None).await?;
        let mine: Vec<String> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["spec"]["volume"] == name)
            .filter_map(|s| s["metadata"]["name"].as_str().map(String::from))
            .collect();
        for s in &mine {
            match c.delete(Kind::Snapshot, s).await {
                Ok(_) => println!("snapshot/{s} deleted"),
                Err(CtlError::Api(f)) if f.reason == "NotFound" => {}
                Err(e) => return Err(e.into()),
            }
        }
        for s in &mine {
            wait_for(c, Kind::Snapshot, s, &WaitFor::Delete, timeout).await?;
        }
        match c.delete(Kind::Volume, name).await {
            Err(CtlError::Api(f)) if f.code == StatusCode::CONFLICT && round < ROUNDS => continue,
            other => return other.map_err(Into::into),
        }
    }
    unreachable!("the last round returns")
}

/// `cobaltctl snapshot volume/NAME`: creates the Snapshot; with `wait`, until it is taken.
pub async fn snapshot(
    c: &Client,
    volume: &str,
    name: Option<String>,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let name = name.unwrap_or_else(|| cobalt_api::snapshot::scheduled_name(volume, Utc::now()));
    let body = serde_json::to_value(cobalt_api::Snapshot::new(&name, volume))?;
    c.create(Kind::Snapshot, &body, false).await?;
    println!("snapshot/{name} created");
    if wait {
        let want = WaitFor::Condition {
            type_: "Ready".into(),
            status: "True".into(),
        };
        wait_for(c, Kind::Snapshot, &name, &want, timeout).await?;
        let s = c.get(Kind::Snapshot, &name).await?.unwrap_or_default();
        println!(
            "snapshot/{name} ready on machine {} ({} of data)",
            s.pointer("/status/machine")
                .and_then(Value::as_str)
                .unwrap_or("?"),
            output::human_bytes(
                s.pointer("/status/sizeBytes")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            ),
        );
    }
    Ok(0)
}

pub enum WaitFor {
    Condition { type_: String, status: String },
    Delete,
}

impl WaitFor {
    pub fn parse(s: &str) -> Result<WaitFor, String> {
        if s == "delete" {
            return Ok(WaitFor::Delete);
        }
        let cond = s
            .strip_prefix("condition=")
            .ok_or_else(|| format!("--for={s:?}: use condition=TYPE[=true|false] or delete"))?;
        let (type_, status) = match cond.split_once('=') {
            Some((t, v)) => (t, v),
            None => (cond, "true"),
        };
        let status = match status.to_ascii_lowercase().as_str() {
            "true" => "True",
            "false" => "False",
            "unknown" => "Unknown",
            other => {
                return Err(format!(
                    "--for condition value {other:?}: use true, false or unknown"
                ))
            }
        };
        Ok(WaitFor::Condition {
            type_: type_.to_string(),
            status: status.into(),
        })
    }

    fn met(&self, v: Option<&Value>) -> bool {
        match (self, v) {
            (WaitFor::Delete, None) => true,
            (WaitFor::Condition { type_, status }, Some(v)) => {
                output::condition(v, type_).is_some_and(|c| c["status"] == status.as_str())
            }
            _ => false,
        }
    }
}

/// Waits with a watch, bounded by `timeout`; on timeout the error shows the last conditions.
pub async fn wait_for(
    c: &Client,
    kind: Kind,
    name: &str,
    want: &WaitFor,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = c.get(kind, name).await?;
    if want.met(last.as_ref()) {
        return Ok(());
    }
    if last.is_none() && matches!(want, WaitFor::Condition { .. }) {
        anyhow::bail!("{} {name:?} not found", kind.singular());
    }
    'outer: while Instant::now() < deadline {
        let list = c.list(kind, None).await?;
        let rv = list
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        last = list["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["metadata"]["name"] == name))
            .cloned();
        if want.met(last.as_ref()) {
            return Ok(());
        }
        let mut stream = c.watch(kind, rv.as_deref(), None).await?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match tokio::time::timeout(left, stream.next()).await {
                Err(_) => break 'outer,
                Ok(Ok(Some(e))) => e,
                Ok(_) => continue 'outer, // stream ended or broke: list and watch again
            };
            if event["object"]["metadata"]["name"] != name {
                continue;
            }
            last = match event["type"].as_str() {
                Some("DELETED") => None,
                Some("ADDED" | "MODIFIED") => Some(event["object"].clone()),
                _ => continue,
            };
            if want.met(last.as_ref()) {
                return Ok(());
            }
        }
    }
    let conditions = last
        .as_ref()
        .and_then(|v| v.pointer("/status/conditions"))
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    format!(
                        "  {}={} ({}): {}",
                        c["type"].as_str().unwrap_or(""),
                        c["status"].as_str().unwrap_or(""),
                        c["reason"].as_str().unwrap_or(""),
                        c["message"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "  (no conditions reported)".into());
    anyhow::bail!("timed out after {timeout:?} waiting for {}/{name}; last observed conditions:\n{conditions}", kind.singular())
}

/// `diff -f`: 0 when live equals what apply would make, 1 when different (diff printed).
pub async fn diff(
    c: &Client,
    files: &[String],
    recursive: bool,
    parallel: usize,
) -> anyhow::Result<i32> {
    use futures::StreamExt;
    let (objects, live) = Live::load(c, files, recursive).await?;
    let mut different = false;
    let mut results = Box::pin(in_order(&objects, parallel, |o| live.get(c, o)));
    while let Some((o, live)) = results.next().await {
        let (before, after) = match live?.as_deref() {
            Some(l) if unchanged(l, &o.manifest) => continue,
            Some(l) => {
                let (before, after) = (strip(l), strip(&desired(l, &o.manifest.value)));
                if before == after {
                    continue; // the same values render the same YAML
                }
                (output::yaml(&before), output::yaml(&after))
            }
            None => (
                String::new(),
                output::yaml(&strip(&desired(&serde_json::json!({}), &o.manifest.value))),
            ),
        };
        if before != after {
            different = true;
            let label = format!("{}/{}", o.kind.singular(), o.name);
            let d = similar::TextDiff::from_lines(&before, &after);
            print!(
                "{}",
                d.unified_diff()
                    .header(&format!("live {label}"), &format!("applied {label}"))
            );
        }
    }
    drop(results);
    leave_to_exit((objects, live));
    Ok(if different { 1 } else { 0 })
}

fn strip(v: &Value) -> Value {
    let mut c = comparable(v);
    if let Some(a) = c
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.remove(LAST_APPLIED);
    }
    if c.pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| a.is_empty())
    {
        c["metadata"]
            .as_object_mut()
            .map(|m| m.remove("annotations"));
    }
    c
}

/// `explain volume.spec.export`: the field's description and its fields, from the schemas.
pub fn explain(path: &str) -> anyhow::Result<i32> {
    let mut parts = path.split('.');
    let kind = Kind::parse(parts.next().unwrap_or_default()).map_err(anyhow::Error::msg)?;
    let file = format!("{}.json", kind.singular());
    let (_, text) = cobalt_api::schema::all()
        .into_iter()
        .find(|(n, _)| *n == file)
        .ok_or_else(|| anyhow::anyhow!("no schema {file}"))?;
    let root: Value = serde_json::from_str(&text)?;
    let resolve = |s: &Value| -> Value {
        let mut s = s.clone();
        for _ in 0..8 {
            if let Some(r) = s.get("$ref").and_then(Value::as_str) {
                s = root
                    .pointer(r.trim_start_matches('#'))
                    .cloned()
                    .unwrap_or(Value::Null);
            } else if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
                // Option<T> is anyOf [T, null]: explain T.
                match any
                    .iter()
                    .find(|a| a.get("type") != Some(&Value::String("null".into())))
                {
                    Some(inner) if any.len() == 2 => s = inner.clone(),
                    _ => break,
                }
            } else {
                break;
            }
        }
        s
    };
    let mut node = resolve(&root);
    let mut walked = vec![kind.singular().to_string()];
    for p in parts {
        let next = node.pointer(&format!("/properties/{p}")).or_else(|| {
            node.pointer("/items")
                .and_then(|i| i.pointer(&format!("/properties/{p}")))
        });
        let field = next
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{} has no field {p:?}", walked.join(".")))?;
        let description = field.get("description").cloned();
        node = resolve(&field);
        if node.get("description").is_none() {
            if let (Some(d), Some(o)) = (description, node.as_object_mut()) {
                o.insert("description".into(), d);
            }
        }
        walked.push(p.to_string());
        if node.get("type") == Some(&Value::String("array".into())) {
            let items = resolve(node.get("items").unwrap_or(&Value::Null));
            let description = node.get("description").cloned();
            node = items;
            if let (Some(d), Some(o)) = (description, node.as_object_mut()) {
                o.entry("description").or_insert(d);
            }
        }
    }
    println!("FIELD: {}", walked.join("."));
    if let Some(d) = node.get("description").and_then(Value::as_str) {
        println!("\nDESCRIPTION:\n  {d}");
    }
    if let Some(values) = node.get("enum").and_then(Value::as_array) {
        println!(
            "\nVALUES: {}",
            values
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        let required: Vec<&str> = node
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!("\nFIELDS:");
        for (name, p) in props {
            let p2 = resolve(p);
            let ty = p2
                .get("type")
                .map(|t| t.to_string().replace('"', ""))
                .unwrap_or_else(|| {
                    if p2.get("properties").is_some() {
                        "object".into()
                    } else if p2.get("enum").is_some() {
                        "string".into()
                    } else {
                        "value".into()
                    }
                });
            let req = if required.contains(&name.as_str()) {
                " (required)"
            } else {
                ""
            };
            let desc = p
                .get("description")
                .or_else(|| p2.get("description"))
                .and_then(Value::as_str)
                .unwrap_or("");
            println!("  {name}\t<{ty}>{req}\n    {desc}");
        }
    }
    Ok(0)
}

/// `move volume/NAME --to MACHINE`: sets `spec.machine` (what a manifest edit would do) and, with
/// `--wait`, follows the move until the source's copy is gone, showing the stage, the bytes sent,
/// the rate and an ETA (one redrawn line on a terminal, plain lines otherwise).
pub async fn move_volume(
    c: &Client,
    name: &str,
    to: &str,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let mut attempts = 0;
    let from = loop {
        let mut v = c
            .get(Kind::Volume, name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("volume {name:?} not found"))?;
        let holder = v
            .pointer("/status/machine")
            .and_then(Value::as_str)
            .map(str::to_string);
        if v.pointer("/spec/machine").and_then(Value::as_str) == Some(to) {
            break holder;
        }
        v["spec"]["machine"] = Value::String(to.to_string());
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        match c.replace(Kind::Volume, name, &v, false).await {
            Ok(_) => break holder,
            // Someone else changed it meanwhile: read again (a bounded number of times).
            Err(CtlError::Api(f)) if f.reason == "Conflict" && attempts < 5 => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    };
    match from.as_deref() {
        Some(f) if f == to => println!("volume/{name} is on machine {to}"),
        Some(f) => println!("volume/{name} moving from machine {f} to {to}"),
        None => {
            println!("volume/{name} bound to machine {to} (not provisioned yet: nothing to move)")
        }
    }
    if !wait {
        return Ok(0);
    }
    follow_move(c, name, to, timeout).await?;
    Ok(0)
}

/// True when the volume's data is on `to` and no move is left to finish.
fn moved(v: &Value, to: &str) -> bool {
    v.pointer("/status/machine").and_then(Value::as_str) == Some(to)
        && v.pointer("/status/move").is_none()
}

async fn follow_move(c: &Client, name: &str, to: &str, timeout: Duration) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdout().is_terminal();
    let deadline = Instant::now() + timeout;
    let mut rate = output::Rate::default();
    let mut last_line = String::new();
    let mut last: Option<Value> = None;
    let mut show = |v: &Value, rate: &mut output::Rate| {
        let line = output::move_progress(v, rate.observe(v));
        if line == last_line {
            return;
        }
        if terminal {
            print!("\r\x1b[2K{line}");
        } else {
            println!("{line}");
        }
        let _ = std::io::stdout().flush();
        last_line = line;
    };
    'outer: while Instant::now() < deadline {
        let Some(v) = c.get(Kind::Volume, name).await? else {
            anyhow::bail!("volume {name:?} was deleted during the move");
        };
        let rv = v
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        show(&v, &mut rate);
        if moved(&v, to) {
            last = Some(v);
            break;
        }
        last = Some(v);
        let mut stream = c.watch(Kind::Volume, rv.as_deref(), None).await?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match tokio::time::timeout(left, stream.next()).await {
                Err(_) => break 'outer,
                Ok(Ok(Some(e))) => e,
                Ok(_) => continue 'outer,
            };
            if event["object"]["metadata"]["name"] != name {
                continue;
            }
            if event["type"] == "DELETED" {
                anyhow::bail!("volume {name:?} was deleted during the move");
            }
            let v = event["object"].clone();
            show(&v, &mut rate);
            let done = moved(&v, to);
            last = Some(v);
            if done {
                break 'outer;
            }
        }
    }
    if terminal {
        println!();
    }
    match last {
        Some(v) if moved(&v, to) => {
            println!("{}", output::move_summary(&v));
            Ok(())
        }
        v => {
            let why = v
                .as_ref()
                .and_then(|v| output::condition(v, "Moving"))
                .and_then(|c| c["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| "no Moving condition reported".into());
            anyhow::bail!("timed out after {timeout:?} waiting for volume/{name} to move to machine {to}: {why}")
        }
    }
}

/// Changes a Machine's spec with `change` (read, change, replace; retried on a conflict a
/// bounded number of times).
async fn edit_machine(c: &Client, name: &str, change: impl Fn(&mut Value)) -> anyhow::Result<()> {
    for _ in 0..5 {
        let mut m = c
            .get(Kind::Machine, name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("machine {name:?} not found"))?;
        let before = m["spec"].clone();
        if !m["spec"].is_object() {
            m["spec"] = serde_json::json!({});
        }
        change(&mut m["spec"]);
        if m["spec"] == before {
            return Ok(());
        }
        if let Some(o) = m.as_object_mut() {
            o.remove("status");
        }
        match c.replace(Kind::Machine, name, &m, false).await {
            Ok(_) => return Ok(()),
            Err(CtlError::Api(f)) if f.reason == "Conflict" => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("machine {name:?} kept changing; try again")
}

/// `cordon NAME`: no new volumes are placed on the machine.
pub async fn cordon(c: &Client, name: &str, on: bool) -> anyhow::Result<i32> {
    edit_machine(c, name, |spec| {
        spec["unschedulable"] = Value::Bool(on);
        if !on {
            if let Some(o) = spec.as_object_mut() {
                o.remove("drain");
                o.remove("drainPinned");
            }
        }
    })
    .await?;
    println!(
        "machine/{name} {}",
        if on { "cordoned" } else { "uncordoned" }
    );
    Ok(0)
}

/// `drain NAME --dry-run`: the plan the leader would follow (every volume → its target, or why
/// it cannot go), changing nothing.
pub async fn drain_plan(c: &Client, name: &str, pinned: bool) -> anyhow::Result<i32> {
    let pinned_q = if pinned { "true" } else { "false" };
    let p = c
        .get_sub(Kind::Machine, name, "drainplan", &[("pinned", pinned_q)])
        .await?;
    let rows: Vec<Vec<String>> = p["moves"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                m["volume"].as_str().unwrap_or("").to_string(),
                m["to"].as_str().unwrap_or("").to_string(),
                output::human_bytes(m["bytes"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("nothing to move off machine {name}");
    } else {
        print!("{}", output::table(&["VOLUME", "TO", "BYTES"], &rows));
    }
    for b in p["blocked"].as_array().into_iter().flatten() {
        println!(
            "blocked: {}: {}",
            b["volume"].as_str().unwrap_or(""),
            b["reason"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

/// `drain NAME [--pinned] [--wait]`: sets `spec.drain` (and `drainPinned`); with `--wait`
/// follows the `Drained` condition until the machine holds nothing.
pub async fn drain(
    c: &Client,
    name: &str,
    pinned: bool,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<i32> {
    edit_machine(c, name, |spec| {
        spec["drain"] = Value::Bool(true);
        if pinned {
            spec["drainPinned"] = Value::Bool(true);
        }
    })
    .await?;
    println!("machine/{name} draining");
    if !wait {
        return Ok(0);
    }
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let m = c
            .get(Kind::Machine, name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("machine {name:?} was deleted"))?;
        if let Some(cond) = output::condition(&m, "Drained") {
            let line = cond["message"].as_str().unwrap_or("").to_string();
            if line != last {
                println!("  {line}");
                last = line;
            }
            if cond["status"] == "True" {
                println!("machine/{name} drained");
                return Ok(0);
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} draining machine {name}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prune_candidates_carry_the_selected_labels_and_apply_annotation() {
        let item = |name: &str, labels: Value, applied: bool| {
            let annotations = if applied {
                json!({LAST_APPLIED: "{}", "other": "x"})
            } else {
                json!({"other": "x"})
            };
            json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}, "spec": {}})
        };
        let items = vec![
            item("mine", json!({"set": "gitops", "tier": "hot"}), true),
            item("not-applied", json!({"set": "gitops"}), false),
            item("other-set", json!({"set": "other"}), true),
            json!({"metadata": {"name": "bare"}}),
            item("mine-too", json!({"set": "gitops"}), true),
        ];
        let body = json!({"items": items}).to_string().into_bytes();
        let listed = Listed::index(body).unwrap();
        let selector: cobalt_api::selector::LabelSelector = "set=gitops".parse().unwrap();
        let mut names = applied_by(&listed, &selector).unwrap();
        names.sort();
        assert_eq!(names, ["mine", "mine-too"]);
    }
}
