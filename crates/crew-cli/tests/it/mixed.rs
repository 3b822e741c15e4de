//! A daemon with an S3 store and two classes at once: aws-batch slots
//! (tagged `cloud`, run by the AWS emulator as local processes) and local
//! slots (tagged `onprem`); a hundred jobs with inputs and outputs and mixed
//! tags each run on a slot whose tags include theirs, their outputs land in
//! the bucket, `crew fetch` brings one back, and `crew down` leaves no Batch
//! job of crew's running or waiting to run. The daemon listens beyond
//! loopback, as it must for Batch: the Batch workers connect with TLS,
//! pinning the daemon's certificate, while the local ones dial loopback.
//!
//! Needs the emulator for S3 and Batch (`CREW_TEST_S3_ENDPOINT` and
//! `CREW_TEST_AWS_ENDPOINT`, set by `cargo xtask ci` and `cargo xtask emu
//! env`); skipped without it, failing under `CI`.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crew_core::store::{Store, StoreKey};
use crew_store_s3::S3Store;
use crew_store_s3::testing::{create_bucket, endpoint, store_url, unique_bucket};

use crate::support::{DEADLINE, Finished, OnDrop, Reaper, aws_crew, poll_until, run, unique};

const JOBS: usize = 100;

/// moto routes a request to a service by its credential scope and checks no
/// signature.
const AUTH: &str = "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/batch/aws4_request, SignedHeaders=host, Signature=0";

/// A Batch API call by hand-written HTTP; the answer's JSON body.
fn batch(endpoint: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the emulator");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{AUTH}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    let json = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{path}: {e}: {answer}"))
}

/// The ids and states of the jobs of `queue` in the states Batch has not
/// finished with.
fn unfinished_batch_jobs(endpoint: &str, queue: &str) -> Vec<(String, String, String)> {
    let mut jobs = Vec::new();
    for status in ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING"] {
        let answer = batch(endpoint, "/v1/listjobs", &serde_json::json!({"jobQueue": queue, "jobStatus": status}));
        for j in answer["jobSummaryList"].as_array().into_iter().flatten() {
            jobs.push((
                j["jobId"].as_str().unwrap_or_default().to_owned(),
                j["jobName"].as_str().unwrap_or_default().to_owned(),
                status.to_owned(),
            ));
        }
    }
    jobs
}

/// The environments of the processes told to dial the controller on `port`
/// (agents, not their jobs: those lose the connection variables).
fn agents_dialing(port: u16) -> Vec<(u32, HashMap<String, String>)> {
    let suffix = format!(":{port}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let env: HashMap<String, String> = raw
            .split(|&c| c == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect();
        if env.get("CREW_CONNECT").is_some_and(|c| c.ends_with(&suffix)) && env.contains_key("CREW_LAUNCH") {
            found.push((pid, env));
        }
    }
    found
}

#[test]
fn mixed_aws_batch_and_local_workers_share_an_s3_store_and_down_leaves_no_batch_job() {
    let test = "mixed_aws_batch_and_local_workers_share_an_s3_store_and_down_leaves_no_batch_job";
    let Some(endpoint) = endpoint(test) else { return };
    // Batch at its own endpoint (the same emulator under `cargo xtask`).
    let Some(batch_endpoint) = crate::aws_batch::endpoint(test) else { return };
    let started = Instant::now();
    let bucket = unique_bucket("crew-mixed");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("mixed-");
    let _reaper = Reaper::new(&mark);
    let def = unique("crew-mixed-def-");
    batch(
        &batch_endpoint,
        "/v1/registerjobdefinition",
        &serde_json::json!({
            "jobDefinitionName": def,
            "type": "container",
            "containerProperties": {
                "image": "crew",
                // No credentials here: the workers open the bucket with
                // those the emulator gives its jobs, as Batch gives a job
                // role's to its containers.
                "command": ["crew", "worker"],
                "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}]
            }
        }),
    );
    let ok = |args: &[&str], deadline: Duration| -> Finished {
        let out = run(aws_crew(d, &mark, &endpoint, args), None, deadline);
        assert_eq!(out.code(), Some(0), "crew {}\n{out}", args.join(" "));
        out
    };
    let stop = || {
        let _ = run(aws_crew(d, &mark, &endpoint, &["down"]), None, DEADLINE);
    };
    let _down = OnDrop(&stop);

    let store = format!("s3://{bucket}/mixed");
    // Beyond loopback, advertising an address the emulator's "containers"
    // reach (the bound port is added).
    let up = aws_crew(
        d,
        &mark,
        &endpoint,
        &["up", "--store", &store, "--listen", "0.0.0.0:0", "--advertise", "127.0.0.1", "--json"],
    );
    let up = run(up, None, DEADLINE);
    assert_eq!(up.code(), Some(0), "{up}");
    let health: serde_json::Value = serde_json::from_str(up.stdout.trim()).expect("up --json");
    let fingerprint = health["tls_sha256"].as_str().unwrap_or_else(|| panic!("TLS is on beyond loopback: {up}"));
    let listen: std::net::SocketAddr = health["listen"].as_str().and_then(|a| a.parse().ok()).expect("listen");
    let advertised = format!("127.0.0.1:{}", listen.port());
    assert_eq!(health["advertise"], advertised.as_str(), "{up}");
    let opt_def = format!("job-definition={def}");
    let opt_endpoint = format!("endpoint={batch_endpoint}");
    let cloud = ok(
        &[
            "recruit",
            "--workers",
            "4",
            "--class",
            "aws-batch",
            "--tags",
            "cloud",
            "--opt",
            "job-queue=crew-q1",
            "--opt",
            &opt_def,
            "--opt",
            &opt_endpoint,
        ],
        DEADLINE,
    );
    assert_eq!(cloud.stdout.lines().count(), 4, "{cloud}");
    // Real Batch workers could not dial loopback (the emulator's can).
    assert!(cloud.stderr.contains("crew: warning:") && cloud.stderr.contains(&advertised), "{cloud}");
    let onprem = ok(&["recruit", "--workers", "2", "--class", "local", "--tags", "onprem"], DEADLINE);
    assert_eq!(onprem.stdout.lines().count(), 2, "{onprem}");

    // Each job counts the bytes of its own input: i+1 bytes.
    let mut lines = String::new();
    for i in 0..JOBS {
        let input = format!("in{i}.txt");
        std::fs::write(d.join(&input), "x".repeat(i + 1)).expect("input");
        let tags: &[&str] = match i % 3 {
            0 => &["cloud"],
            1 => &["onprem"],
            _ => &[],
        };
        lines.push_str(
            &serde_json::json!({
                "name": format!("j{i}"),
                "shell": "wc -c < in.txt > out.txt; echo $CREW_WORKER >> out.txt",
                "inputs": [format!("{input}=in.txt")],
                "outputs": ["out.txt"],
                "tags": tags,
            })
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(d.join("jobs.jsonl"), lines).expect("jobs file");
    let sent = ok(&["send", "--file", "jobs.jsonl"], DEADLINE);
    assert_eq!(sent.stdout.lines().count(), JOBS, "{sent}");

    // The Batch jobs crew submitted, seen while they serve.
    let mut batch_ids: HashSet<String> = HashSet::new();
    let mut slot_tags: HashMap<String, (String, Vec<String>)> = HashMap::new();
    let mut look = || -> serde_json::Value {
        let out = ok(&["status", "--json"], DEADLINE);
        let status: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("status --json");
        for s in status["slots"].as_array().expect("slots") {
            let name = s["name"].as_str().expect("slot name").to_owned();
            let tags = s["tags"].as_array().expect("tags").iter().map(|t| t.as_str().expect("tag").to_owned());
            slot_tags.insert(name, (s["class"].as_str().expect("class").to_owned(), tags.collect()));
            if s["class"] == "aws-batch" {
                if let Some(h) = s["handle"].as_str() {
                    batch_ids.insert(h.split(':').next().unwrap_or(h).to_owned());
                }
            }
        }
        status["jobs"].clone()
    };
    look();
    let receive = aws_crew(d, &mark, &endpoint, &["receive", "--wait", "--all", "--json"]);
    let receiving = crate::support::start(receive, None);
    // Poll the handles while the jobs run (a slot's handle goes with it).
    let mut counts = serde_json::Value::Null;
    poll_until(Duration::from_secs(60), || {
        counts = look();
        counts["queued"] == 0 && counts["running"] == 0
    });
    let out = receiving.wait(Duration::from_secs(75));
    assert_eq!(out.code(), Some(0), "{out}");
    look();
    let records = out.records();
    assert_eq!(records.len(), JOBS, "{out}");
    let mut by_name = HashMap::new();
    for r in &records {
        assert_eq!(r["status"], "succeeded", "{r}");
        let slot = r["slot"].as_str().unwrap_or_else(|| panic!("no slot: {r}"));
        let (class, tags) = slot_tags.get(slot).unwrap_or_else(|| panic!("{slot} not in crew status: {slot_tags:?}"));
        assert_eq!(r["class"], class.as_str(), "{r}");
        for t in r["tags"].as_array().expect("tags") {
            assert!(tags.iter().any(|s| s == t.as_str().expect("tag")), "{r} ran on {slot} with tags {tags:?}");
        }
        let name = r["name"].as_str().expect("name").to_owned();
        let i: usize = name[1..].parse().expect("job number");
        match i % 3 {
            0 => assert_eq!(class, "aws-batch", "{r}"),
            1 => assert_eq!(class, "local", "{r}"),
            _ => {}
        }
        let objects = r["objects"].as_array().unwrap_or_else(|| panic!("no objects: {r}"));
        assert_eq!(objects.len(), 1, "{r}");
        by_name.insert(name, r.clone());
    }
    assert!(!batch_ids.is_empty(), "no Batch job seen in crew status: {slot_tags:?}");

    // The agents still up: Batch ones were given the pin (so they spoke
    // TLS), local ones loopback and no pin.
    let (mut batch_agents, mut local_agents) = (0, 0);
    for (pid, env) in agents_dialing(listen.port()) {
        if env.contains_key("AWS_BATCH_JOB_ID") {
            batch_agents += 1;
            assert_eq!(env.get("CREW_TLS_SHA256").map(String::as_str), Some(fingerprint), "agent {pid}: {env:?}");
        } else {
            local_agents += 1;
            assert_eq!(env.get("CREW_TLS_SHA256").map(String::as_str), Some(""), "agent {pid}: {env:?}");
        }
        assert_eq!(env.get("CREW_CONNECT"), Some(&advertised), "agent {pid}");
    }
    assert!(batch_agents > 0 && local_agents > 0, "agents seen: {batch_agents} Batch, {local_agents} local");

    // The outputs are objects in the bucket, under the prefix.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let root = S3Store::open(&store_url(&endpoint, &bucket, "")).await.expect("open the bucket");
        for r in by_name.values() {
            let key = r["objects"][0]["key"].as_str().expect("object key");
            let object = StoreKey::new(format!("mixed/{key}")).expect("key");
            root.head(&object).await.unwrap_or_else(|e| panic!("{object}: {e}"));
        }
    });

    // A sample fetched back: the count, then the slot it ran on.
    for name in ["j0", "j1", "j2", "j99"] {
        let r = &by_name[name];
        let i: usize = name[1..].parse().expect("number");
        let id = r["id"].as_u64().expect("id").to_string();
        let to = d.join(format!("got-{name}"));
        ok(&["fetch", &id, "--to", to.to_str().expect("utf-8")], DEADLINE);
        let text = std::fs::read_to_string(to.join("out.txt")).expect("fetched out.txt");
        let got: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(got, [(i + 1).to_string().as_str(), r["slot"].as_str().expect("slot")], "{name}: {r}");
    }

    // `crew down`: no Batch job of crew's is left running or waiting (its
    // idle workers are, before).
    let ours = |jobs: Vec<(String, String, String)>| -> Vec<(String, String, String)> {
        jobs.into_iter().filter(|(id, _, _)| batch_ids.contains(id.split(':').next().unwrap_or(id))).collect()
    };
    let before = ours(unfinished_batch_jobs(&batch_endpoint, "crew-q1"));
    assert!(before.iter().any(|(_, _, s)| s == "RUNNING"), "crew's Batch workers are not RUNNING: {before:?}");
    ok(&["down"], DEADLINE);
    let mut left = Vec::new();
    let gone = poll_until(Duration::from_secs(20), || {
        left = ours(unfinished_batch_jobs(&batch_endpoint, "crew-q1"));
        left.is_empty()
    });
    assert!(gone, "Batch jobs crew started are still unfinished after `crew down`: {left:?}");
    eprintln!("{test}: {:?}", started.elapsed());
}
