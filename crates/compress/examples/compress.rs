//! Compress one image to a byte target.
//!
//! `cargo run --release --example compress -- IN OUT [--max-bytes N] [--max-dim N] [--format jpeg|webp]`

use kiln_compress::{CompressOptions, OutputFormat, compress};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut files = Vec::new();
    let mut opts = CompressOptions::default();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--max-bytes" => opts.max_bytes = args.next().ok_or("--max-bytes N")?.parse()?,
            "--max-dim" => opts.max_dimension = args.next().ok_or("--max-dim N")?.parse()?,
            "--format" => {
                opts.format = match args.next().as_deref() {
                    Some("jpeg") => OutputFormat::Jpeg,
                    Some("webp") => OutputFormat::Webp,
                    _ => return Err("--format jpeg|webp".into()),
                }
            }
            _ => files.push(a),
        }
    }
    let [input, output] = <[String; 2]>::try_from(files).map_err(|_| "usage: IN OUT [options]")?;
    let data = std::fs::read(&input)?;
    let out = compress(&data, &opts)?;
    std::fs::write(&output, &out.bytes)?;
    println!(
        "{input} -> {output}: {} -> {} bytes, {}x{}, q {:?}, {} encodes, {:?}",
        data.len(),
        out.bytes.len(),
        out.width,
        out.height,
        out.quality,
        out.encodes,
        out.timings
    );
    Ok(())
}
