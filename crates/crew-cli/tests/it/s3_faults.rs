//! `crew run` with an S3 store behind a fault-injecting proxy
//! (`crew_store_s3::testing::FaultProxy`: 503 SlowDown, connections dropped
//! before answering, mid-request and mid-response): the controller stages
//! inputs and the agents fetch them and upload outputs through the faults;
//! every job still succeeds, and every output comes back byte-identical,
//! fetched directly from the emulator and through the proxy.
//!
//! Then the scripted faults: an output upload that meets 20 s of 503
//! SlowDown and a 10 s outage still succeeds with the defaults; an outage
//! that lasts fails the job within the store URL's `retry_timeout`; AWS's
//! answers to a wrong region end `crew run` and `crew fetch` with exit 2
//! and the bucket's region.

use std::time::Duration;

use crew_store_s3::PART_SIZE;
use crew_store_s3::testing::{
    Fault, FaultProxy, Outage, WrongRegion, create_bucket, endpoint, list_keys, mix, store_url, unique_bucket,
};
use sha2::{Digest, Sha256};

use crate::support::{DEADLINE, Reaper, aws_crew, run, unique};

const JOBS: usize = 20;
/// Jobs whose output includes a copy of the shared input (a multipart upload).
const BIG_COPY_EVERY: usize = 7;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn random(seed: u64, n: usize) -> Vec<u8> {
    (0..n.div_ceil(8))
        .flat_map(|i| mix(seed ^ (i as u64).wrapping_mul(0x1234_5678_9abc_def1)).to_le_bytes())
        .take(n)
        .collect()
}

#[test]
fn jobs_through_a_faulty_s3_endpoint_all_succeed_and_outputs_fetch_back_identical() {
    let test = "jobs_through_a_faulty_s3_endpoint_all_succeed_and_outputs_fetch_back_identical";
    let Some(endpoint) = endpoint(test) else { return };
    let bucket = unique_bucket("crew-cli-faults");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let seed = mix(u64::from(std::process::id()) ^ 0xfa_u64);
    let proxy = FaultProxy::start(&endpoint, 220, &Fault::ALL, seed).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("fault proxy {} seed {seed:#x} (22% of requests faulted)", proxy.url());

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("s3-faults-");
    let _reaper = Reaper::new(&mark);

    // One shared input of more than one part (a multipart upload), and one
    // small input per job.
    let shared = random(seed, PART_SIZE + 1_234_567);
    std::fs::write(d.join("shared.bin"), &shared).expect("write shared");
    let mut lines = Vec::new();
    let mut inputs = Vec::new();
    for i in 0..JOBS {
        let own = random(seed ^ mix(i as u64 + 1), 100_000 + i * 3_001);
        std::fs::write(d.join(format!("in-{i}.bin")), &own).expect("write input");
        let big = i % BIG_COPY_EVERY == 0;
        let copy_shared = if big { " && cp shared.bin out/shared.bin" } else { "" };
        let shell =
            format!("mkdir -p out && cp in.bin out/own.bin && sha256sum shared.bin in.bin > out/sums.txt{copy_shared}");
        lines.push(
            serde_json::json!({
                "name": format!("job-{i}"),
                "shell": shell,
                "inputs": ["shared.bin", format!("in-{i}.bin=in.bin")],
                "outputs": ["out/*"],
            })
            .to_string(),
        );
        inputs.push(own);
    }
    std::fs::write(d.join("jobs.txt"), lines.join("\n") + "\n").expect("write jobs");

    let through_proxy = store_url(proxy.url(), &bucket, "run");
    let direct = store_url(&endpoint, &bucket, "run");
    let out = run(
        aws_crew(d, &mark, proxy.url(), &["run", "--json", "--workers", "2", "--store", &through_proxy, "jobs.txt"]),
        None,
        Duration::from_secs(120),
    );
    let during = proxy.counts();
    eprintln!("fault proxy after the run: {during:?} ({:?})", out.elapsed);
    assert_eq!(out.code(), Some(0), "{out}");
    let records = out.records();
    assert_eq!(records.len(), JOBS, "{out}");

    // The run went through many faults (which kinds depends on the order of
    // the requests; every kind is required over the whole test, below), and
    // no upload was bad.
    assert!(during.faults() >= 10, "too few faults during the run to prove anything: {during:?}");
    assert_eq!(during.bad_checksums, 0, "uploads without a correct x-amz-checksum-sha256: {during:?}");

    // Every output, fetched directly and through the faults, is what the
    // job wrote.
    for (i, own) in inputs.iter().enumerate() {
        let name = format!("job-{i}");
        let record = records.iter().find(|r| r["name"] == name.as_str()).unwrap_or_else(|| panic!("no {name}: {out}"));
        assert_eq!(record["exit_code"], 0, "{record}");
        let id = record["id"].as_u64().unwrap_or_else(|| panic!("no id: {record}")).to_string();
        let mut want = vec![
            ("own.bin", own.clone()),
            ("sums.txt", format!("{}  shared.bin\n{}  in.bin\n", sha256_hex(&shared), sha256_hex(own)).into_bytes()),
        ];
        if i % BIG_COPY_EVERY == 0 {
            want.push(("shared.bin", shared.clone()));
        }
        let objects = record["objects"].as_array().unwrap_or_else(|| panic!("no objects: {record}"));
        assert_eq!(objects.len(), want.len(), "{record}");
        for (file, bytes) in &want {
            let object = objects
                .iter()
                .find(|o| o["name"] == format!("out/{file}").as_str())
                .unwrap_or_else(|| panic!("no out/{file}: {record}"));
            assert_eq!(object["sha256"], sha256_hex(bytes).as_str(), "{name} out/{file}: {record}");
        }
        for (how, store, via) in [("direct", &direct, endpoint.as_str()), ("proxy", &through_proxy, proxy.url())] {
            let to = d.join(format!("fetched-{how}/{i}"));
            let to_arg = to.to_string_lossy().into_owned();
            let out = run(
                aws_crew(d, &mark, via, &["fetch", "--store", store, &id, "--to", &to_arg]),
                None,
                Duration::from_secs(60),
            );
            assert_eq!(out.code(), Some(0), "fetch {name} ({how}): {out}");
            for (file, bytes) in &want {
                let got = std::fs::read(to.join("out").join(file))
                    .unwrap_or_else(|e| panic!("{name} out/{file} ({how}): {e}"));
                assert_eq!(got.len(), bytes.len(), "{name} out/{file} ({how})");
                assert_eq!(sha256_hex(&got), sha256_hex(bytes), "{name} out/{file} ({how})");
            }
        }
    }
    let after = proxy.counts();
    eprintln!("fault proxy after the fetches: {after:?}");
    assert!(after.faults() > during.faults(), "no fault during the fetches: {after:?}");
    for kind in Fault::ALL {
        assert!(after.of(kind) > 0, "no {kind:?} in the whole test: {after:?}");
    }
}

#[test]
fn an_output_upload_rides_out_20s_of_slowdown_and_a_10s_outage_and_fetches_back_by_name() {
    let test = "an_output_upload_rides_out_20s_of_slowdown_and_a_10s_outage_and_fetches_back_by_name";
    let Some(endpoint) = endpoint(test) else { return };
    let bucket = unique_bucket("crew-cli-outage");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let proxy = FaultProxy::start(&endpoint, 0, &[], 1).unwrap_or_else(|e| panic!("{e}"));
    // Once the second part of the output's multipart upload is sent: 20 s
    // of 503 SlowDown to everything, then 10 s with every connection
    // dropped. The store URL retries for 60 s, so no pause between tries
    // is longer than 7.5 s (an eighth of it) and a try must meet the 10 s
    // of dropped connections; with the default 120 s, a 15 s pause could
    // step over them (the test then failed now and then).
    let slow = Duration::from_secs(20);
    let down = Duration::from_secs(10);
    proxy.schedule("partNumber=2", &[(Outage::SlowDown, slow), (Outage::Down, down)]);

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mark = unique("s3-outage-");
    let _reaper = Reaper::new(&mark);
    let data = random(0x07a6e, 2 * PART_SIZE + 54_321);
    std::fs::write(d.join("data.bin"), &data).expect("write input");
    let job = serde_json::json!({
        "name": "copy-ü",
        "shell": "cp data.bin big.bin && printf umlaut > ü.txt && printf hash > 'a#b.txt'",
        "inputs": ["data.bin"],
        "outputs": ["big.bin", "ü.txt", "a#b.txt"],
    });
    let through_proxy = store_url(proxy.url(), &bucket, "run");
    let retrying = format!("{through_proxy}&retry_timeout=60s");
    let out = run(
        aws_crew(d, &mark, proxy.url(), &["run", "--json", "--store", &retrying, "-"]),
        Some(&format!("{job}\n")),
        Duration::from_secs(150),
    );
    let seen = proxy.counts();
    eprintln!("fault proxy after the run: {seen:?} ({:?})", out.elapsed);
    assert_eq!(out.code(), Some(0), "{out}");
    assert!(seen.outage_slow_downs >= 3, "the upload did not meet the 503s: {seen:?}");
    assert!(seen.outage_drops >= 1, "the upload did not meet the outage: {seen:?}");
    assert!(out.elapsed >= slow + down, "the run ended before the outage did: {:?}", out.elapsed);
    let record = &out.records()[0];
    let id = record["id"].as_u64().unwrap_or_else(|| panic!("{record}"));

    // Fetched back by name, directly and through the proxy, byte for byte.
    let want: [(&str, &[u8]); 3] = [("big.bin", &data), ("ü.txt", b"umlaut"), ("a#b.txt", b"hash")];
    for (how, store, via) in [
        ("direct", store_url(&endpoint, &bucket, "run"), endpoint.as_str()),
        ("proxy", through_proxy.clone(), proxy.url()),
    ] {
        let to = d.join(format!("fetched-{how}"));
        let to_arg = to.to_string_lossy().into_owned();
        let out =
            run(aws_crew(d, &mark, via, &["fetch", "--store", &store, "copy-ü", "--to", &to_arg]), None, DEADLINE);
        assert_eq!(out.code(), Some(0), "fetch by name ({how}): {out}");
        assert!(out.stderr.contains(&format!("of job {id} into")), "{out}");
        for (file, bytes) in want {
            let got = std::fs::read(to.join(file)).unwrap_or_else(|e| panic!("{file} ({how}): {e}"));
            assert_eq!(sha256_hex(&got), sha256_hex(bytes), "{file} ({how})");
        }
    }
    // Other S3 clients find the outputs under their own names.
    let keys = list_keys(&endpoint, &bucket, &format!("run/jobs/{id}/")).unwrap_or_else(|e| panic!("{e}"));
    for file in ["big.bin", "ü.txt", "a#b.txt"] {
        let key = format!("run/jobs/{id}/1/outputs/{file}");
        assert!(keys.contains(&key), "no object {key}: {keys:?}");
    }
}

#[test]
fn a_lasting_outage_fails_the_upload_within_the_store_urls_retry_timeout() {
    let test = "a_lasting_outage_fails_the_upload_within_the_store_urls_retry_timeout";
    let Some(endpoint) = endpoint(test) else { return };
    let bucket = unique_bucket("crew-cli-down");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let proxy = FaultProxy::start(&endpoint, 0, &[], 1).unwrap_or_else(|e| panic!("{e}"));
    proxy.schedule("/outputs/", &[(Outage::Down, Duration::MAX)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("s3-down-");
    let _reaper = Reaper::new(&mark);
    // 3 s of retries, which the agent gets with the store URL.
    let store = format!("{}&retry_timeout=3s", store_url(proxy.url(), &bucket, "run"));
    let out = run(
        aws_crew(dir.path(), &mark, proxy.url(), &["run", "--json", "--store", &store, "--output", "out.txt", "-"]),
        Some("echo done > out.txt\n"),
        Duration::from_secs(120),
    );
    eprintln!("fault proxy: {:?} ({:?})", proxy.counts(), out.elapsed);
    assert_eq!(out.code(), Some(1), "{out}");
    let record = &out.records()[0];
    assert_eq!(record["status"], "failed", "{record}");
    let error = record["error"].as_str().unwrap_or_else(|| panic!("no error: {record}"));
    assert!(error.contains("could not upload output out.txt"), "{error}");
    assert!(error.contains("gave up after retrying for") && error.contains("retry_timeout=3s"), "{error}");
    // The upload and the manifest each gave up after about 3 s, not the
    // default two minutes each.
    assert!(out.elapsed < Duration::from_secs(60), "took {:?}", out.elapsed);
    assert!(proxy.counts().outage_drops >= 4, "{:?}", proxy.counts());
}

#[test]
fn a_wrong_region_ends_run_and_fetch_with_exit_2_naming_the_buckets_region() {
    let test = "a_wrong_region_ends_run_and_fetch_with_exit_2_naming_the_buckets_region";
    let Some(endpoint) = endpoint(test) else { return };
    let bucket = unique_bucket("crew-cli-region");
    create_bucket(&endpoint, &bucket).unwrap_or_else(|e| panic!("{e}"));
    let proxy = FaultProxy::start(&endpoint, 0, &[], 1).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = unique("s3-region-");
    let _reaper = Reaper::new(&mark);
    let store = store_url(proxy.url(), &bucket, "run");
    let touched = dir.path().join("touched");
    for how in [WrongRegion::Redirect, WrongRegion::AuthorizationHeaderMalformed] {
        proxy.wrong_region(Some(("eu-west-1", how)));
        let jobs = format!("touch {}\n", touched.display());
        let out =
            run(aws_crew(dir.path(), &mark, proxy.url(), &["run", "--store", &store, "-"]), Some(&jobs), DEADLINE);
        assert_eq!(out.code(), Some(2), "{how:?}: {out}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{how:?}: one line: {out}");
        assert!(lines[0].contains(&format!("bucket {bucket} is in region eu-west-1, not us-east-1")), "{how:?}: {out}");
        assert!(
            lines[0].contains("add ?region=eu-west-1 to the store URL") && lines[0].contains("AWS_REGION"),
            "{out}"
        );
        assert!(!touched.exists(), "a job ran although the store is unusable");
        let out = run(aws_crew(dir.path(), &mark, proxy.url(), &["fetch", "--store", &store, "1"]), None, DEADLINE);
        assert_eq!(out.code(), Some(2), "{how:?}: {out}");
        assert!(out.stderr.contains("is in region eu-west-1"), "{how:?}: {out}");
    }
    assert!(proxy.counts().wrong_region >= 4, "{:?}", proxy.counts());
}
