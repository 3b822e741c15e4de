//! Printing output records: a human table, or JSON Lines (`--json`).
//!
//! **API boundary:** the JSON Lines form is the serialized
//! `crew_core::Output` (format version in its `v` field), one per line,
//! in the order jobs finish. The table is for people and may change.

use std::io::Write;

use crew_core::Output;

pub(crate) struct Printer<W: Write> {
    json: bool,
    out: W,
    header: bool,
    /// The reader went away (broken pipe): print nothing more.
    closed: bool,
}

impl<W: Write> Printer<W> {
    pub(crate) fn new(json: bool, out: W) -> Self {
        Self { json, out, header: false, closed: false }
    }

    /// True once the output's reader has gone away.
    pub(crate) fn closed(&self) -> bool {
        self.closed
    }

    /// Prints one record; a closed pipe is not an error but ends printing.
    pub(crate) fn print(&mut self, o: &Output) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        match self.write(o) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Prints one record given as its JSON (one line, as the daemon's
    /// receive answer carries it): as it is for JSON Lines, which is that
    /// same serialization, saving a parse and a serialization per record;
    /// parsed for the table. A record that does not parse is an error.
    pub(crate) fn print_json(&mut self, json: &[u8]) -> anyhow::Result<()> {
        if !self.json {
            let o: Output = serde_json::from_slice(json)?;
            return self.print(&o);
        }
        if self.closed {
            return Ok(());
        }
        if json.first() != Some(&b'{') || json.last() != Some(&b'}') {
            anyhow::bail!("not an output record: {}", String::from_utf8_lossy(&json[..json.len().min(80)]));
        }
        let written = self.out.write_all(json).and_then(|()| self.out.write_all(b"\n"));
        match written {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Pushes buffered records out; a closed pipe ends printing.
    pub(crate) fn flush(&mut self) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        match self.out.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            r => Ok(r?),
        }
    }

    fn write(&mut self, o: &Output) -> std::io::Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.out, o)?;
            self.out.write_all(b"\n")?;
            return Ok(());
        }
        if !self.header {
            writeln!(
                self.out,
                "{:>6}  {:<16}  {:<13}  {:>4}  {:>8}  {:<10}  {:>3}  OUTPUT",
                "ID", "NAME", "STATUS", "EXIT", "SECONDS", "SLOT", "TRY"
            )?;
            self.header = true;
        }
        let exit = match (o.exit_code, o.signal) {
            (Some(c), _) => c.to_string(),
            (None, Some(s)) => format!("s{s}"),
            _ => "-".to_owned(),
        };
        let detail = match &o.error {
            Some(e) if !o.succeeded() => e.clone(),
            _ => first_line(&o.stdout.text),
        };
        writeln!(
            self.out,
            "{:>6}  {:<16}  {:<13}  {:>4}  {:>8.3}  {:<10}  {:>3}  {}",
            o.id.0,
            clip(o.name.as_deref().unwrap_or("-"), 16),
            o.status.as_str(),
            exit,
            o.wall_seconds,
            clip(o.slot.as_deref().unwrap_or("-"), 10),
            o.attempt,
            clip(&detail, 60),
        )?;
        Ok(())
    }

    pub(crate) fn summary(&mut self, total: usize, received: usize, failed: usize) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        match self.out.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            r => r?,
        }
        if !self.json {
            eprintln!(
                "crew: {total} job(s): {} succeeded, {failed} did not{}",
                received - failed,
                if received < total { format!(", {} without a record", total - received) } else { String::new() }
            );
        }
        Ok(())
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_owned()
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
