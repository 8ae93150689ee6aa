//! Throughput of kiln-compress over a set of files, one image per thread.
//!
//! `cargo run --release --example compress_bench -- --max-bytes 300000 --max-dim 2048 --threads 2 FILE...`
//!
//! Prints one line per file (name, in/out bytes, out WxH, quality, encodes, ms), then a
//! summary JSON object as the last line.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use kiln_compress::{CompressOptions, compress};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut opts = CompressOptions::default();
    let mut threads = 1usize;
    let mut files = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--max-bytes" => opts.max_bytes = args.next().ok_or("--max-bytes N")?.parse()?,
            "--max-dim" => opts.max_dimension = args.next().ok_or("--max-dim N")?.parse()?,
            "--threads" => threads = args.next().ok_or("--threads N")?.parse()?,
            _ => files.push(a),
        }
    }
    let inputs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| Ok((f.clone(), std::fs::read(f)?)))
        .collect::<Result<_, std::io::Error>>()?;
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((name, data)) = inputs.get(i) else {
                        break;
                    };
                    let t = Instant::now();
                    let r = compress(data, &opts);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    if let Ok(mut v) = results.lock() {
                        v.push((i, name.clone(), data.len(), r, ms));
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut results = results.into_inner().map_err(|_| "poisoned")?;
    results.sort_by_key(|r| r.0);
    let (mut fit, mut total_in, mut total_out) = (0usize, 0usize, 0usize);
    for (_, name, len, r, ms) in &results {
        total_in += len;
        let base = std::path::Path::new(name)
            .file_name()
            .map_or(name.clone(), |n| n.to_string_lossy().into());
        match r {
            Ok(c) => {
                if c.bytes.len() <= opts.max_bytes && c.width.max(c.height) <= opts.max_dimension {
                    fit += 1;
                }
                total_out += c.bytes.len();
                let q = c.quality.map_or("pass".to_string(), |q| q.to_string());
                println!(
                    "{base}\t{len}\t{}\t{}x{}\tq={q}\tencodes={}\t{ms:.1}ms",
                    c.bytes.len(),
                    c.width,
                    c.height,
                    c.encodes
                );
            }
            Err(e) => println!("{base}\t{len}\tERROR {e}\t{ms:.1}ms"),
        }
    }
    println!(
        "{{\"images\":{},\"fit\":{fit},\"images_per_s\":{:.3},\"total_in_bytes\":{total_in},\"total_out_bytes\":{total_out}}}",
        results.len(),
        results.len() as f64 / elapsed
    );
    Ok(())
}
