//! Job inputs and outputs through the local store, end to end: `crew run`
//! and the daemon stage inputs, agents fetch them (verified) and upload
//! outputs, `crew fetch` brings them back byte for byte; escapes, symbolic
//! links and corrupted objects are refused.

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::{DEADLINE, Finished, Reaper, crew, run, unique};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Some bytes that are not all alike, `n` long.
fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn write_jobs(dir: &Path, lines: &[&str]) -> String {
    let path = dir.join("jobs.txt");
    std::fs::write(&path, lines.join("\n") + "\n").expect("cannot write the job file");
    path.to_string_lossy().into_owned()
}

/// `crew run --json --workers 2 --store STORE FILE` in `dir`.
fn crew_run(dir: &Path, mark: &str, store: &Path, jobs: &str) -> Finished {
    let store = store.to_string_lossy().into_owned();
    run(crew(dir, mark, &["run", "--json", "--workers", "2", "--store", &store, jobs]), None, DEADLINE)
}

fn by_name(records: &[Value], name: &str) -> Value {
    records.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no record {name}: {records:?}")).clone()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
    }
    out
}

#[test]
fn run_stages_inputs_uploads_outputs_and_fetch_brings_them_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-run-");
    let _reaper = Reaper::new(&mark);
    let bytes = data(300_000);
    std::fs::write(d.join("data.bin"), &bytes).expect("write data");
    let jobs = write_jobs(
        d,
        &[
            r#"{"name":"count","shell":"wc -c < data.bin > count.txt","inputs":["data.bin"],"outputs":["count.txt"]}"#,
            r#"{"name":"copy","shell":"mkdir -p out && cp in.bin out/copy.bin","inputs":["data.bin=in.bin"],"outputs":["out/*"]}"#,
        ],
    );
    let store = d.join("store");
    let out = crew_run(d, &mark, &store, &jobs);
    assert_eq!(out.code(), Some(0), "{out}");
    let records = out.records();

    let count = by_name(&records, "count");
    let id = count["id"].as_u64().expect("id");
    let attempt = count["attempt"].as_u64().expect("attempt");
    let objects = count["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 1, "{count}");
    let text = std::fs::read(store.join(format!("jobs/{id}/{attempt}/outputs/count.txt"))).expect("count.txt stored");
    assert_eq!(String::from_utf8_lossy(&text).trim(), "300000");
    assert_eq!(objects[0]["name"], "count.txt");
    assert_eq!(objects[0]["key"], format!("jobs/{id}/{attempt}/outputs/count.txt"));
    assert_eq!(objects[0]["size"], text.len() as u64);
    assert_eq!(objects[0]["sha256"], sha256_hex(&text));

    let copy = by_name(&records, "copy");
    let id = copy["id"].as_u64().expect("id");
    let attempt = copy["attempt"].as_u64().expect("attempt");
    let objects = copy["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 1, "{copy}");
    assert_eq!(objects[0]["name"], "out/copy.bin");
    assert_eq!(objects[0]["size"], bytes.len() as u64);
    assert_eq!(objects[0]["sha256"], sha256_hex(&bytes));
    let stored = store.join(format!("jobs/{id}/{attempt}/outputs/out/copy.bin"));
    assert_eq!(std::fs::read(&stored).expect("copy stored"), bytes);
    assert!(store.join(format!("jobs/{id}/{attempt}/manifest.json")).is_file());
    // The input went to the store once, content-addressed.
    assert!(store.join(format!("cas/sha256/{}", sha256_hex(&bytes))).is_file());

    // Fetch from the store alone, as from another machine.
    let store_arg = store.to_string_lossy().into_owned();
    let to = d.join("fetched");
    let to_arg = to.to_string_lossy().into_owned();
    let fetch = ["fetch", "--store", store_arg.as_str(), &id.to_string(), "--to", to_arg.as_str(), "--json"];
    let out = run(crew(d, &mark, &fetch), None, DEADLINE);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(std::fs::read(to.join("out/copy.bin")).expect("fetched"), bytes);
    let lines = out.records();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["name"], "out/copy.bin");
    assert_eq!(lines[0]["sha256"], sha256_hex(&bytes));

    // A tampered output: the fetch fails and leaves no file behind.
    std::fs::write(&stored, data(300_001)).expect("tamper");
    let to2 = d.join("fetched2");
    let to2_arg = to2.to_string_lossy().into_owned();
    let out = run(crew(d, &mark, &["fetch", "--store", &store_arg, &id.to_string(), "--to", &to2_arg]), None, DEADLINE);
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(out.stderr.contains("checksum mismatch"), "{out}");
    assert!(files_under(&to2).is_empty(), "{:?}", files_under(&to2));
    std::fs::write(&stored, data(299_999)).expect("tamper");
    let out = run(crew(d, &mark, &["fetch", "--store", &store_arg, &id.to_string(), "--to", &to2_arg]), None, DEADLINE);
    assert_eq!(out.code(), Some(3), "{out}");
    assert!(files_under(&to2).is_empty(), "{:?}", files_under(&to2));

    // Unknown jobs say so.
    let out = run(crew(d, &mark, &["fetch", "--store", &store_arg, "999", "--to", &to2_arg]), None, DEADLINE);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("job 999 has no manifest"), "{out}");
}

#[test]
fn twenty_jobs_sharing_an_input_make_one_store_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-dedup-");
    let _reaper = Reaper::new(&mark);
    std::fs::write(d.join("shared.bin"), data(100_000)).expect("write data");
    let line = r#"{"shell":"test -s shared.bin","inputs":["shared.bin"]}"#;
    let jobs = write_jobs(d, &[line; 20]);
    let store = d.join("store");
    let out = crew_run(d, &mark, &store, &jobs);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(out.records().len(), 20);
    let cas = files_under(&store.join("cas"));
    assert_eq!(cas.len(), 1, "{cas:?}");
}

#[test]
fn escaping_names_are_refused_at_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-escape-");
    let _reaper = Reaper::new(&mark);
    std::fs::write(d.join("x"), b"x").expect("write");
    for bad in ["../../etc/passwd", "/abs/path", "a/../../b"] {
        let output = format!(r#"{{"shell":"true","outputs":["{bad}"]}}"#);
        let input = format!(r#"{{"shell":"true","inputs":["x={bad}"]}}"#);
        let input_obj = format!(r#"{{"shell":"true","inputs":[{{"path":"x","name":"{bad}"}}]}}"#);
        let jobs = write_jobs(d, &["true", &output, &input, &input_obj]);
        let out = crew_run(d, &mark, &d.join("store"), &jobs);
        assert_eq!(out.code(), Some(2), "{out}");
        for line in [2, 3, 4] {
            assert!(out.stderr.contains(&format!("jobs.txt:{line}: ")), "line {line}: {out}");
        }
        assert!(out.stderr.contains("output"), "{out}");
        assert!(out.stderr.contains("input name"), "{out}");
        // crew send refuses them before any daemon is started.
        let out = run(crew(d, &mark, &["send", "--output", bad, "--", "true"]), None, DEADLINE);
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(out.stderr.contains("output"), "{out}");
        let input = format!("x={bad}");
        let out = run(crew(d, &mark, &["send", "--input", &input, "--", "true"]), None, DEADLINE);
        assert_eq!(out.code(), Some(2), "{out}");
        assert!(out.stderr.contains("input name"), "{out}");
    }
    assert!(!d.join(".crew").join("crew.sock").exists(), "no daemon was started");
    assert!(!d.join("store").exists() || files_under(&d.join("store")).is_empty());
}

#[test]
fn failed_jobs_upload_outputs_but_never_symlinks_leading_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-fail-");
    let _reaper = Reaper::new(&mark);
    std::fs::write(d.join("secret.txt"), b"secret").expect("write");
    let secret = d.join("secret.txt");
    let line = format!(
        r#"{{"name":"f","shell":"echo partial > log.txt; ln -s {} leak.txt; mkdir sub; ln -s {} sub/up; exit 3","outputs":["*.txt","sub/up/*","**/secret.txt"]}}"#,
        secret.display(),
        d.display()
    );
    let missing = r#"{"name":"m","shell":"true","outputs":["result.rds"]}"#;
    let jobs = write_jobs(d, &[&line, missing]);
    let store = d.join("store");
    let out = crew_run(d, &mark, &store, &jobs);
    assert_eq!(out.code(), Some(1), "{out}");
    let records = out.records();
    let f = by_name(&records, "f");
    assert_eq!(f["status"], "failed", "{f}");
    assert_eq!(f["exit_code"], 3, "{f}");
    let names: Vec<&str> =
        f["objects"].as_array().expect("objects").iter().filter_map(|o| o["name"].as_str()).collect();
    assert_eq!(names, ["log.txt"], "{f}");
    let stored = files_under(&store.join("jobs"));
    assert!(stored.iter().all(|p| std::fs::read(p).map_or(true, |b| b != b"secret")), "{stored:?}");
    let m = by_name(&records, "m");
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(m["error"], "declared output result.rds was not produced", "{m}");
}

#[test]
fn a_corrupted_store_object_fails_the_attempt_instead_of_running_on_wrong_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-corrupt-");
    let _reaper = Reaper::new(&mark);
    let bytes = data(50_000);
    std::fs::write(d.join("data.bin"), &bytes).expect("write data");
    let store = d.join("store");
    // The first run stages the input.
    let jobs = write_jobs(d, &[r#"{"shell":"cmp -s data.bin data.bin","inputs":["data.bin"]}"#]);
    let out = crew_run(d, &mark, &store, &jobs);
    assert_eq!(out.code(), Some(0), "{out}");
    // Someone overwrites the staged object (same size, other bytes).
    let object = store.join(format!("cas/sha256/{}", sha256_hex(&bytes)));
    let mut wrong = bytes.clone();
    wrong[100] ^= 1;
    std::fs::write(&object, &wrong).expect("corrupt");
    // The next sender checks the content, not the size: it puts the input
    // back, and the job runs on the right data.
    let jobs = write_jobs(d, &[r#"{"name":"c","shell":"touch ran.txt","inputs":["data.bin"],"outputs":["ran.txt"]}"#]);
    let out = crew_run(d, &mark, &store, &jobs);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(out.stderr.contains("other content"), "the repair is reported: {out}");
    assert_eq!(std::fs::read(&object).expect("object"), bytes, "the object was put back");

    // Corrupted after staging, before the agent fetches it (one worker:
    // the first job corrupts the object, the second reads it): the agent's
    // check catches it and the job never runs.
    let corrupt = d.join("wrong.bin");
    std::fs::write(&corrupt, &wrong).expect("write");
    let first = serde_json::json!({"name": "corrupt", "command": ["cp", corrupt, object]}).to_string();
    let second = r#"{"name":"c","shell":"touch ran.txt","inputs":["data.bin"],"outputs":["ran.txt"],"retries":0}"#;
    let jobs = write_jobs(d, &[&first, second]);
    let store_arg = store.to_string_lossy().into_owned();
    let out = run(crew(d, &mark, &["run", "--json", "--workers", "1", "--store", &store_arg, &jobs]), None, DEADLINE);
    assert_eq!(out.code(), Some(1), "{out}");
    let c = by_name(&out.records(), "c");
    assert_eq!(c["status"], "failed", "{c}");
    let error = c["error"].as_str().expect("error");
    assert!(error.starts_with("could not fetch input \"data.bin\": checksum mismatch"), "{error}");
    assert!(c.get("objects").is_none(), "the job never ran: {c}");
}

/// Stops the daemon of `dir` when dropped.
struct Down<'a> {
    dir: &'a Path,
    mark: &'a str,
    project: String,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = run(crew(self.dir, self.mark, &["--dir", &self.project, "down"]), None, DEADLINE);
    }
}

#[test]
fn the_daemon_stages_inputs_and_fetch_gets_outputs_by_id_or_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-daemon-");
    let _reaper = Reaper::new(&mark);
    let project = d.join("project").join(".crew").to_string_lossy().into_owned();
    let _down = Down { dir: d, mark: &mark, project: project.clone() };
    // The sender works in its own folder; relative inputs are from there.
    let work = d.join("work");
    std::fs::create_dir(&work).expect("mkdir");
    let bytes = data(123_457);
    std::fs::write(work.join("data.bin"), &bytes).expect("write data");
    let ok = |args: &[&str]| {
        let mut all = vec!["--dir", project.as_str()];
        all.extend_from_slice(args);
        let out = run(crew(&work, &mark, &all), None, DEADLINE);
        assert_eq!(out.code(), Some(0), "crew {}\n{out}", all.join(" "));
        out
    };
    ok(&["recruit", "--workers", "2", "--class", "local"]);
    let out = ok(&[
        "send",
        "--name",
        "copy-1",
        "--input",
        "data.bin=in/d.bin",
        "--output",
        "out/*",
        "--output",
        "count.txt",
        "--",
        "sh",
        "-c",
        "mkdir out && cp in/d.bin out/copy.bin && wc -c < in/d.bin > count.txt",
    ]);
    let id: u64 = out.stdout.trim().parse().expect("an id");
    ok(&["wait"]);
    let out = ok(&["receive", "--json", "--all"]);
    let record = out.records().into_iter().find(|r| r["id"] == id).expect("the record");
    assert_eq!(record["status"], "succeeded", "{record}");
    let objects = record["objects"].as_array().expect("objects");
    assert_eq!(objects.len(), 2, "{record}");
    let copy = objects.iter().find(|o| o["name"] == "out/copy.bin").expect("copy");
    assert_eq!(copy["sha256"], sha256_hex(&bytes));
    assert_eq!(copy["size"], bytes.len() as u64);
    // The journal holds the staged job, not the local path.
    let journal = std::fs::read_to_string(Path::new(&project).join("journal.jsonl")).expect("journal");
    assert!(journal.contains("cas/sha256/"), "{journal}");

    // By id, into a folder relative to the sender's.
    ok(&["fetch", &id.to_string(), "--to", "got"]);
    assert_eq!(std::fs::read(work.join("got/out/copy.bin")).expect("fetched"), bytes);
    assert_eq!(std::fs::read_to_string(work.join("got/count.txt")).expect("count").trim(), "123457");
    // By name, after receive.
    let out = ok(&["fetch", "copy-1", "--to", "by-name", "--json"]);
    assert_eq!(out.records().len(), 2, "{out}");
    assert_eq!(std::fs::read(work.join("by-name/out/copy.bin")).expect("fetched"), bytes);

    // A job file: relative inputs are from the sender's folder too.
    std::fs::write(work.join("jobs.txt"), "{\"name\":\"f\",\"shell\":\"cmp d.bin data.bin && echo same > same.txt\",\"inputs\":[\"data.bin=d.bin\",\"data.bin\"],\"outputs\":[\"same.txt\"]}\n").expect("write");
    ok(&["send", "--file", "jobs.txt"]);
    let out = ok(&["receive", "--wait", "--json", "--name", "f"]);
    let f = by_name(&out.records(), "f");
    assert_eq!(f["status"], "succeeded", "{f}");
    assert_eq!(f["objects"][0]["name"], "same.txt", "{f}");
    let cas = files_under(&Path::new(&project).join("store").join("cas"));
    assert_eq!(cas.len(), 1, "one object for one file, however it is named: {cas:?}");

    // A job without outputs, an unknown job.
    let out = ok(&["send", "--", "true"]);
    let plain = out.stdout.trim().to_owned();
    ok(&["wait"]);
    let fail = |args: &[&str]| {
        let mut all = vec!["--dir", project.as_str()];
        all.extend_from_slice(args);
        run(crew(&work, &mark, &all), None, DEADLINE)
    };
    let out = fail(&["fetch", &plain]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("has no outputs"), "{out}");
    let out = fail(&["fetch", "nobody"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("no output yet"), "{out}");
    // A missing input file is refused, and nothing is accepted.
    let out = fail(&["send", "--input", "missing.bin", "--", "true"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("missing.bin"), "{out}");
    let out = ok(&["status", "--json"]);
    assert!(out.stdout.contains("\"queued\":0"), "{out}");
}

/// The peak resident memory (VmHWM, bytes) of each `crew` process carrying
/// `mark`, polled until `stop` is set.
fn watch_peaks(
    mark: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<std::collections::HashMap<u32, (String, u64)>> {
    std::thread::spawn(move || {
        let mut peaks = std::collections::HashMap::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for pid in crate::support::marked_pids(&mark) {
                if std::fs::read_to_string(format!("/proc/{pid}/comm")).map_or(true, |c| c.trim() != "crew") {
                    continue;
                }
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
                let hwm = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024;
                let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let role = if args.split(|&b| b == 0).any(|a| a == b"worker") { "agent" } else { "run" };
                let e = peaks.entry(pid).or_insert((role.to_owned(), 0));
                e.1 = e.1.max(hwm);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peaks
    })
}

/// Data streams: staging a large input (in `crew run`, the controller's
/// process) and fetching it, running, and uploading a large output (in the
/// agent) never hold the file in memory. The size is `CREW_TEST_BIG_MIB`
/// (default 160 MiB, above what a whole-file buffer could hide under the
/// limits; 1024 to check the 1 GiB case by hand).
#[test]
fn large_inputs_and_outputs_stream_in_bounded_memory() {
    let mib: usize = std::env::var("CREW_TEST_BIG_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(160);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-big-");
    let _reaper = Reaper::new(&mark);
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(d.join("big.bin")).expect("create"));
        let block = data(1 << 20);
        for _ in 0..mib {
            f.write_all(&block).expect("write");
        }
        f.flush().expect("flush");
    }
    let jobs = write_jobs(
        d,
        &[
            r#"{"name":"big","shell":"mkdir -p out && cp in.bin out/big.bin","inputs":["big.bin=in.bin"],"outputs":["out/*"]}"#,
        ],
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_peaks(mark.clone(), std::sync::Arc::clone(&stop));
    let store = d.join("store").to_string_lossy().into_owned();
    let running =
        crate::support::start(crew(d, &mark, &["run", "--json", "--workers", "1", "--store", &store, &jobs]), None);
    let out = running.wait(std::time::Duration::from_secs(600));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peaks = watcher.join().expect("watcher");
    assert_eq!(out.code(), Some(0), "peaks {peaks:?}\n{out}");
    let record = by_name(&out.records(), "big");
    assert_eq!(record["objects"][0]["size"], (mib << 20) as u64, "{record}");
    let roles: Vec<&str> = peaks.values().map(|(r, _)| r.as_str()).collect();
    assert!(roles.contains(&"agent") && roles.contains(&"run"), "{peaks:?}");
    for (pid, (role, peak)) in &peaks {
        let limit: u64 = if role == "agent" { 128 << 20 } else { 64 << 20 };
        assert!(*peak < limit, "{role} {pid} peaked at {} MiB (limit {} MiB)", peak >> 20, limit >> 20);
    }
}

#[test]
fn a_missing_input_stops_crew_run_before_anything_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-missing-");
    let _reaper = Reaper::new(&mark);
    let jobs = write_jobs(d, &["touch ran.txt", r#"{"shell":"true","inputs":["nowhere.csv"]}"#]);
    let out = crew_run(d, &mark, &d.join("store"), &jobs);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("input \"nowhere.csv\"") && out.stderr.contains("nowhere.csv"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(!d.join("ran.txt").exists());
    // --input on the command line applies to every line.
    std::fs::write(d.join("shared.txt"), b"hello").expect("write");
    let jobs = write_jobs(d, &["cat shared.txt", r#"{"name":"n","shell":"cat s.txt","inputs":["shared.txt=s.txt"]}"#]);
    let store = d.join("store").to_string_lossy().into_owned();
    let out = run(
        crew(d, &mark, &["run", "--json", "--store", &store, "--input", "shared.txt", "--output", "*.txt", &jobs]),
        None,
        DEADLINE,
    );
    assert_eq!(out.code(), Some(0), "{out}");
    for r in out.records() {
        assert_eq!(r["stdout"]["text"], "hello", "{r}");
        assert!(!r["objects"].as_array().expect("objects").is_empty(), "{r}");
    }
}

#[test]
fn fetch_refuses_a_manifest_naming_files_outside_the_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("stage-evil-");
    let _reaper = Reaper::new(&mark);
    let store = d.join("store");
    let outputs = store.join("jobs/5/1/outputs");
    std::fs::create_dir_all(&outputs).expect("mkdir");
    std::fs::write(outputs.join("x"), b"evil").expect("write");
    let sha = sha256_hex(b"evil");
    for name in ["../../escaped", "/tmp/escaped", "a/../../escaped"] {
        let manifest = serde_json::json!({"v": 1, "id": 5, "attempt": 1, "status": "succeeded",
            "objects": [{"name": name, "key": "jobs/5/1/outputs/x", "size": 4, "sha256": sha}]});
        std::fs::write(store.join("jobs/5/1/manifest.json"), manifest.to_string()).expect("write");
        let to = d.join("a").join("b");
        let (store_arg, to_arg) = (store.to_string_lossy().into_owned(), to.to_string_lossy().into_owned());
        let out = run(crew(d, &mark, &["fetch", "--store", &store_arg, "5", "--to", &to_arg]), None, DEADLINE);
        // A manifest read back is verified before it is trusted: one that
        // names a file outside the folder is an altered store (exit 3).
        assert_eq!(out.code(), Some(3), "{out}");
        assert!(out.stderr.contains("cannot be trusted") && out.stderr.contains("working folder"), "{out}");
        assert!(!d.join("escaped").exists() && !d.join("a/escaped").exists() && !Path::new("/tmp/escaped").exists());
    }
}
