//! Reading a capture as a stream: the format is told from its first bytes, then base64 lines,
//! raw length-prefixed frames, or a pcap / pcapng capture (parsed by `pcap-parser`) are read a
//! piece at a time, so a capture of any size, or one still being written to standard input,
//! is decoded in bounded memory.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::rc::Rc;

use pcap_parser::pcapng::Block;
use pcap_parser::traits::{PcapNGPacketBlock, PcapReaderIterator};
use pcap_parser::{LegacyPcapReader, PcapBlockOwned, PcapError, PcapNGReader};

use super::flows::{Flows, Held, ReadLimits};
use super::packet::{tcp_segment, Endpoint, Segment};
use super::{base64_decode, CaptureError, Captured, Direction};
use crate::frame::{self, MAX_PAYLOAD};

/// How much of the input is looked at to tell text from raw frames.
const SNIFF: usize = 4096;
/// The largest pcapng section header read before parsing starts.
const SNIFF_MAX: usize = 64 << 10;
/// The pcap reader's buffer: grown for a larger packet record, up to `MAX_RECORD`.
const PCAP_BUFFER: usize = 256 << 10;
const MAX_RECORD: usize = 16 << 20;
/// A base64 line longer than this (four times the largest frame, encoded) is refused.
const MAX_LINE: usize = 4 * (MAX_PAYLOAD as usize + frame::HEADER_LEN) * 4 / 3 + 1024;

/// The input, remembering the error of a failed read (the pcap parser keeps only that one
/// happened) and how many bytes were read.
struct Source<'r> {
    inner: Box<dyn Read + 'r>,
    error: Rc<RefCell<Option<std::io::Error>>>,
}

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let copy = std::io::Error::new(e.kind(), e.to_string());
                    *self.error.borrow_mut() = Some(e);
                    return Err(copy);
                }
                Ok(n) => return Ok(n),
            }
        }
    }
}

enum Format<'r> {
    Lines {
        input: BufReader<Source<'r>>,
        line: usize,
    },
    Frames {
        input: BufReader<Source<'r>>,
        n: u64,
    },
    Pcap {
        reader: Box<dyn PcapReaderIterator + 'r>,
        /// Link types of the current section's interfaces (pcapng) or of the file (pcap).
        links: Vec<u32>,
        flows: Flows,
    },
    Done,
}

/// The payloads of a capture, read from `input` as they complete: an iterator of
/// [`Captured`] and of [`CaptureError`]s for what could not be read. Format detection is
/// that of [`super::read_capture`]. A capture-level error (a truncated or malformed file, a
/// failed read) comes last, after every payload read before it.
pub struct CaptureReader<'r> {
    format: Format<'r>,
    direction: Direction,
    out: VecDeque<Result<Captured, CaptureError>>,
    error: Rc<RefCell<Option<std::io::Error>>>,
    /// Bytes of the input consumed by the pcap parser, for error positions.
    position: u64,
    peak: Held,
}

impl<'r> CaptureReader<'r> {
    /// Reads `input`; `direction` is that of unframed input (base64 lines, raw frames), and
    /// `port` the manager's TCP port in pcap input.
    pub fn new(input: impl Read + 'r, direction: Direction, port: u16) -> CaptureReader<'r> {
        Self::with_limits(input, direction, port, ReadLimits::default())
    }

    /// As [`CaptureReader::new`], with the memory bounds of TCP reassembly given.
    pub fn with_limits(
        input: impl Read + 'r,
        direction: Direction,
        port: u16,
        limits: ReadLimits,
    ) -> CaptureReader<'r> {
        let error = Rc::new(RefCell::new(None));
        let mut source = Source {
            inner: Box::new(input),
            error: error.clone(),
        };
        let mut reader = CaptureReader {
            format: Format::Done,
            direction,
            out: VecDeque::new(),
            error,
            position: 0,
            peak: Held::default(),
        };
        // The first bytes, read whole even from a pipe that delivers them piecemeal: enough to
        // tell the format, and for a capture its whole file header (and no more, so that a
        // live capture's first packets print as they come).
        let mut head = Vec::with_capacity(SNIFF);
        let sniffed = fill_to(&mut source, &mut head, 4).and_then(|()| {
            if head.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
                // pcapng: the section header block's length, in the byte order of its magic.
                fill_to(&mut source, &mut head, 12)?;
                let len =
                    head.get(4..8)
                        .and_then(|b| b.first_chunk::<4>())
                        .map_or(0, |b| match head.get(8..12) {
                            Some([0x4d, 0x3c, 0x2b, 0x1a]) => u32::from_le_bytes(*b),
                            _ => u32::from_be_bytes(*b),
                        }) as usize;
                fill_to(&mut source, &mut head, len.min(SNIFF_MAX))
            } else if is_pcap_magic(&head) {
                fill_to(&mut source, &mut head, 24)
            } else {
                fill_to(&mut source, &mut head, SNIFF)
            }
        });
        if let Err(e) = sniffed {
            reader.out.push_back(Err(CaptureError::Read {
                offset: head.len() as u64,
                error: e.to_string(),
            }));
            return reader;
        }
        if head.is_empty() {
            return reader;
        }
        let pcap = is_pcap_magic(&head);
        let text = head
            .iter()
            .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace());
        let ng = head.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]);
        let rest = Source {
            inner: Box::new(std::io::Cursor::new(head).chain(source)),
            error: reader.error.clone(),
        };
        reader.format = if pcap {
            let opened = if ng {
                PcapNGReader::new(PCAP_BUFFER, rest)
                    .map(|r| Box::new(r) as Box<dyn PcapReaderIterator + 'r>)
            } else {
                LegacyPcapReader::new(PCAP_BUFFER, rest)
                    .map(|r| Box::new(r) as Box<dyn PcapReaderIterator + 'r>)
            };
            match opened {
                Ok(reader) => Format::Pcap {
                    reader,
                    links: Vec::new(),
                    flows: Flows::new(port, limits),
                },
                Err(e) => {
                    let e = capture_error(&e, 0);
                    reader.out.push_back(Err(e));
                    Format::Done
                }
            }
        } else if text {
            Format::Lines {
                input: BufReader::new(rest),
                line: 0,
            }
        } else {
            Format::Frames {
                input: BufReader::new(rest),
                n: 0,
            }
        };
        reader
    }

    /// What TCP reassembly holds now (pcap input).
    pub fn held(&self) -> Held {
        match &self.format {
            Format::Pcap { flows, .. } => flows.held(),
            _ => Held::default(),
        }
    }

    /// The most TCP reassembly held at once while reading (pcap input).
    pub fn peak_held(&self) -> Held {
        match &self.format {
            Format::Pcap { flows, .. } => flows.peak(),
            _ => self.peak,
        }
    }

    /// Reads until something is ready or the input ends.
    fn fill(&mut self) {
        while self.out.is_empty() {
            match &mut self.format {
                Format::Done => return,
                Format::Lines { input, line } => {
                    *line += 1;
                    match read_line(input) {
                        Ok(None) => self.format = Format::Done,
                        Ok(Some(Err(()))) => self.out.push_back(Err(CaptureError::Base64 {
                            origin: format!("line {line}: longer than {MAX_LINE} bytes"),
                        })),
                        Ok(Some(Ok(text))) => {
                            read_base64_line(&text, *line, self.direction, &mut self.out)
                        }
                        Err(e) => {
                            self.out.push_back(Err(CaptureError::Read {
                                offset: 0,
                                error: format!("line {line}: {e}"),
                            }));
                            self.format = Format::Done;
                        }
                    }
                }
                Format::Frames { input, n } => {
                    *n += 1;
                    let origin = format!("frame {n}");
                    match read_frame(input) {
                        Ok(None) => self.format = Format::Done,
                        Ok(Some(payload)) => self.out.push_back(Ok(Captured {
                            origin,
                            direction: self.direction,
                            connection: None,
                            payload,
                        })),
                        Err(FrameRead::Frame(error)) => {
                            self.out
                                .push_back(Err(CaptureError::Frame { origin, error }));
                            self.format = Format::Done;
                        }
                        Err(FrameRead::Io(e)) => {
                            self.out.push_back(Err(CaptureError::Read {
                                offset: 0,
                                error: format!("{origin}: {e}"),
                            }));
                            self.format = Format::Done;
                        }
                    }
                }
                Format::Pcap {
                    reader,
                    links,
                    flows,
                } => {
                    match next_packet(reader.as_mut(), links, &mut self.position) {
                        Step::Segment(Some((src, dst, seg))) => {
                            flows.push(src, dst, seg, &mut self.out)
                        }
                        Step::Segment(None) => {}
                        Step::Refill => {
                            let before = reader.data().len();
                            let refilled = reader.refill().is_ok();
                            let stuck = refilled
                                && !reader.reader_exhausted()
                                && reader.data().len() == before;
                            // A full buffer that the parser still finds short: make room.
                            if stuck && (before * 2 > MAX_RECORD || !reader.grow(before * 2)) {
                                flows.flush(&mut self.out);
                                self.out.push_back(Err(CaptureError::Pcap(format!(
                                    "a record at byte {} is larger than {MAX_RECORD} bytes",
                                    self.position
                                ))));
                                self.format = Format::Done;
                            } else if !refilled {
                                let error = self
                                    .error
                                    .borrow_mut()
                                    .take()
                                    .map_or_else(|| "read failed".to_owned(), |e| e.to_string());
                                flows.flush(&mut self.out);
                                self.out.push_back(Err(CaptureError::Read {
                                    offset: self.position,
                                    error,
                                }));
                                self.format = Format::Done;
                            }
                        }
                        Step::End(error) => {
                            // Unfinished frames and holes first; the capture's own error last.
                            flows.flush(&mut self.out);
                            if let Some(e) = error {
                                self.out.push_back(Err(e));
                            }
                            self.peak = flows.peak();
                            self.format = Format::Done;
                        }
                    }
                }
            }
        }
    }
}

impl Iterator for CaptureReader<'_> {
    type Item = Result<Captured, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.fill();
        self.out.pop_front()
    }
}

enum Step {
    /// A block read: the TCP segment it carries, if any.
    Segment(Option<(Endpoint, Endpoint, Segment)>),
    /// More input is needed.
    Refill,
    /// The capture ended, cleanly or with this error.
    End(Option<CaptureError>),
}

/// One block of a pcap or pcapng capture.
fn next_packet(
    reader: &mut dyn PcapReaderIterator,
    links: &mut Vec<u32>,
    position: &mut u64,
) -> Step {
    let (used, step) = match reader.next() {
        Ok((used, block)) => {
            let step = match block {
                PcapBlockOwned::LegacyHeader(h) => {
                    // The upper bits carry the FCS length, not the link type.
                    *links = vec![(h.network.0 as u32) & 0x0fff_ffff];
                    None
                }
                PcapBlockOwned::Legacy(b) => {
                    tcp_segment(links.first().copied().unwrap_or(1), b.data)
                }
                PcapBlockOwned::NG(Block::SectionHeader(_)) => {
                    links.clear();
                    None
                }
                PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                    links.push(idb.linktype.0 as u32);
                    None
                }
                PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => links
                    .get(epb.if_id as usize)
                    .and_then(|&link| tcp_segment(link, epb.packet_data())),
                PcapBlockOwned::NG(Block::SimplePacket(spb)) => links
                    .first()
                    .and_then(|&link| tcp_segment(link, spb.packet_data())),
                PcapBlockOwned::NG(_) => None,
            };
            (used, Step::Segment(step))
        }
        Err(PcapError::Eof) => return Step::End(None),
        Err(PcapError::Incomplete(_)) => return Step::Refill,
        Err(PcapError::BufferTooSmall) => {
            let size = reader.data().len().max(PCAP_BUFFER) * 2;
            if size > MAX_RECORD || !reader.grow(size) {
                return Step::End(Some(CaptureError::Pcap(format!(
                    "a record at byte {position} is larger than {MAX_RECORD} bytes"
                ))));
            }
            return Step::Refill;
        }
        Err(e) => return Step::End(Some(capture_error(&e, *position))),
    };
    reader.consume(used);
    *position += used as u64;
    step
}

fn capture_error(e: &PcapError<&[u8]>, position: u64) -> CaptureError {
    match e {
        PcapError::UnexpectedEof | PcapError::Incomplete(_) => {
            CaptureError::Truncated { offset: position }
        }
        PcapError::HeaderNotRecognized => {
            CaptureError::Pcap("the file header is not pcap or pcapng".to_owned())
        }
        PcapError::NomError(_, kind) | PcapError::OwnedNomError(_, kind) => {
            CaptureError::Pcap(format!(
                "malformed block at byte {position} ({})",
                kind.description()
            ))
        }
        PcapError::Eof => CaptureError::Pcap("the capture is empty".to_owned()),
        PcapError::BufferTooSmall => {
            CaptureError::Pcap(format!("a record at byte {position} is too large"))
        }
        PcapError::ReadError => CaptureError::Read {
            offset: position,
            error: "read failed".to_owned(),
        },
    }
}

fn is_pcap_magic(head: &[u8]) -> bool {
    matches!(
        head.first_chunk::<4>(),
        Some(
            [0xd4, 0xc3, 0xb2, 0xa1]
                | [0xa1, 0xb2, 0xc3, 0xd4]
                | [0x4d, 0x3c, 0xb2, 0xa1]
                | [0xa1, 0xb2, 0x3c, 0x4d]
                | [0x0a, 0x0d, 0x0d, 0x0a]
        )
    )
}

/// Reads into `head` until it holds `want` bytes or the input ends.
fn fill_to(input: &mut impl Read, head: &mut Vec<u8>, want: usize) -> std::io::Result<()> {
    if head.len() < want {
        let missing = (want - head.len()) as u64;
        input.take(missing).read_to_end(head)?;
    }
    Ok(())
}

/// One line without its end; `Err(())` when it is longer than [`MAX_LINE`] (the rest of it is
/// skipped). `None` at the end of the input.
fn read_line(input: &mut impl BufRead) -> std::io::Result<Option<Result<Vec<u8>, ()>>> {
    let mut line = Vec::new();
    let n = input.take(MAX_LINE as u64).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') && line.len() >= MAX_LINE {
        let mut skipped = Vec::new();
        loop {
            skipped.clear();
            let n = input
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut skipped)?;
            if n == 0 || skipped.last() == Some(&b'\n') {
                return Ok(Some(Err(())));
            }
        }
    }
    Ok(Some(Ok(line)))
}

fn read_base64_line(
    line: &[u8],
    n: usize,
    direction: Direction,
    out: &mut VecDeque<Result<Captured, CaptureError>>,
) {
    let line = line.trim_ascii();
    if line.is_empty() {
        return;
    }
    let origin = format!("line {n}");
    let Some(bytes) = base64_decode(line) else {
        out.push_back(Err(CaptureError::Base64 { origin }));
        return;
    };
    // Length-prefixed frames when the headers tile the line exactly; a bare payload otherwise
    // (payloads start with '!', '#' or ':', which never read as a valid length covering the
    // rest).
    let (frames, used, err) = frame::scan(&bytes, MAX_PAYLOAD);
    if frames > 0 && used == bytes.len() && err.is_none() {
        let mut at = 0;
        let mut k = 0;
        while let Ok(Some(total)) = frame::check(&bytes[at..], MAX_PAYLOAD) {
            k += 1;
            out.push_back(Ok(Captured {
                origin: format!("{origin} frame {k}"),
                direction,
                connection: None,
                payload: bytes[at + frame::HEADER_LEN..at + total].to_vec(),
            }));
            at += total;
        }
    } else {
        out.push_back(Ok(Captured {
            origin,
            direction,
            connection: None,
            payload: bytes,
        }));
    }
}

enum FrameRead {
    Frame(frame::FrameError),
    Io(std::io::Error),
}

/// One raw length-prefixed frame's payload; `None` at a clean end.
fn read_frame(input: &mut impl Read) -> Result<Option<Vec<u8>>, FrameRead> {
    let mut header = [0u8; frame::HEADER_LEN];
    let got = read_full(input, &mut header).map_err(FrameRead::Io)?;
    if got == 0 {
        return Ok(None);
    }
    if got < header.len() {
        return Err(FrameRead::Frame(frame::FrameError::Truncated {
            buffered: got,
            needed: frame::HEADER_LEN,
        }));
    }
    let len = frame::check_header(header, MAX_PAYLOAD).map_err(FrameRead::Frame)?;
    let mut payload = vec![0u8; len];
    let got = read_full(input, &mut payload).map_err(FrameRead::Io)?;
    if got < len {
        return Err(FrameRead::Frame(frame::FrameError::Truncated {
            buffered: frame::HEADER_LEN + got,
            needed: frame::HEADER_LEN + len,
        }));
    }
    Ok(Some(payload))
}

/// Reads until `buf` is full or the input ends; the count read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match input.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}
