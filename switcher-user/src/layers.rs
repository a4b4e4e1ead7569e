//! The crate's layers, checked: each module may import (`crate::…`) only modules of a lower
//! layer or of its own; nothing imports upwards. A unit test reads the sources under `src/`
//! and fails naming the file and line of an import that breaks the table below, or a module
//! the table does not place.
//!
//! ```text
//! 5 agent                        the daemon: one owner of the engine, socket, checks, metrics
//! 4 fleet                        the desired state in etcd, followed through the engine
//! 3 engine                       the switch rules and the switchboard, in front of the maps
//! 2 dataplane flowcount maglev   the node's I/O: maps, pins, Maglev, attach, flow counts,
//!   flowlist flowtable emergency flow listings, the mapped flow table, the emergency path,
//!   health                       health probes
//! 1 config                       the file, parsed and validated
//! 0 protocol accounts limits     the wire types and leaf helpers: import nothing of the crate
//!   pins slab steps shadow
//! ```
//!
//! The CLI (`src/cli`, in the binary) sits on top and uses the library's public API.

/// Layer of each module of the library; a module may import lower layers and its own.
const LAYERS: &[(&str, u8)] = &[
    ("protocol", 0),
    ("accounts", 0),
    ("limits", 0),
    ("pins", 0),
    ("slab", 0),
    ("steps", 0),
    ("shadow", 0),
    ("config", 1),
    ("dataplane", 2),
    ("flowcount", 2),
    ("flowlist", 2),
    ("flowtable", 2),
    ("maglev", 2),
    ("emergency", 2),
    ("health", 2),
    ("engine", 3),
    ("fleet", 4),
    ("agent", 5),
];

/// Imports that break the table today, by exact text: `(from, to, a word on the line)`.
/// None: keep it that way.
const KNOWN: &[(&str, &str, &str)] = &[];

mod tests {
    use std::path::{Path, PathBuf};

    use super::{KNOWN, LAYERS};

    /// The module (first path component under `src/`) of a source file.
    fn module_of(src: &Path, file: &Path) -> Option<String> {
        let rel = file.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_str()?;
        let name = first.strip_suffix(".rs").unwrap_or(first);
        (!matches!(name, "lib" | "main" | "cli" | "layers")).then(|| name.to_owned())
    }

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The crate modules a source imports, with the line of each: `crate::x` paths, and the
    /// top-level names of `crate::{…}` groups. Comments are left out (doc links are not
    /// imports).
    fn imports(text: &str) -> Vec<(String, usize, String)> {
        let code: Vec<&str> = text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect();
        let joined = code.join("\n");
        let line_of = |at: usize| joined[..at].matches('\n').count();
        let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
        let mut out = Vec::new();
        for (at, _) in joined.match_indices("crate::") {
            let rest = &joined[at + "crate::".len()..];
            let line = line_of(at);
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level names of the group: after its `{` and after each `,` at depth 1.
                let (mut depth, mut expect) = (1, true);
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 1 => expect = true,
                        c if depth == 1 && expect && (c.is_alphanumeric() || c == '_') => {
                            let name = ident(&group[i..]);
                            let l = line_of(at + "crate::{".len() + i);
                            out.push((name, l, code[l].to_owned()));
                            expect = false;
                        }
                        _ => {}
                    }
                    if depth == 0 {
                        break;
                    }
                }
            } else {
                out.push((ident(rest), line, code[line].to_owned()));
            }
        }
        out
    }

    #[test]
    fn the_layers_run_one_way() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let layer = |m: &str| LAYERS.iter().find(|(n, _)| *n == m).map(|(_, l)| *l);
        let mut files = Vec::new();
        sources(&src, &mut files);
        files.sort();
        let mut problems = Vec::new();
        let mut edges = 0;
        for file in &files {
            let Some(from) = module_of(&src, file) else { continue };
            let Some(mine) = layer(&from) else {
                problems.push(format!("{}: module {from} has no layer in layers.rs", file.display()));
                continue;
            };
            let text = std::fs::read_to_string(file).expect("read source");
            for (to, line, code) in imports(&text) {
                if to == from || to == "self" {
                    continue;
                }
                edges += 1;
                let Some(theirs) = layer(&to) else {
                    problems.push(format!("{}:{}: crate::{to} is not a module with a layer", file.display(), line + 1));
                    continue;
                };
                let known = KNOWN.iter().any(|(f, t, word)| *f == from && *t == to && code.contains(word));
                if (theirs > mine || (mine == 0 && theirs == 0)) && !known {
                    problems.push(format!(
                        "{}:{}: {from} (layer {mine}) imports {to} (layer {theirs}): {}",
                        file.display(),
                        line + 1,
                        code.trim()
                    ));
                }
            }
        }
        assert!(edges > 20, "the scan found only {edges} imports: it is not reading the sources");
        assert!(problems.is_empty(), "imports against the layers (see src/layers.rs):\n{}", problems.join("\n"));
    }

    #[test]
    fn the_scan_sees_both_import_forms() {
        let text = "use crate::{\n    config::{self, A},\n    engine::Handle, health,\n};\nfn f() { crate::fleet::run(); } // crate::agent\n";
        let found: Vec<(String, usize)> = imports(text).into_iter().map(|(m, l, _)| (m, l)).collect();
        let want = [("fleet", 4), ("config", 1), ("engine", 2), ("health", 2)];
        let mut want: Vec<(String, usize)> = want.iter().map(|(m, l)| ((*m).to_owned(), *l)).collect();
        let mut found = found;
        found.sort();
        want.sort();
        assert_eq!(found, want, "a comment is not an import");
    }
}
