"""Build mullama: llama.cpp's static libraries first (cached), then the Cython extension.

See tools/build_llama_cpp.py for the llama.cpp build and its environment
variables (CMAKE_ARGS, MULLAMA_CUDA, MULLAMA_BUILD_CACHE, MULLAMA_NATIVE).
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))


class BuildExt(build_ext):
    def run(self):
        import build_llama_cpp

        bdir = build_llama_cpp.build()
        src = build_llama_cpp.DEFAULT_DEST
        libs = build_llama_cpp.static_libs(bdir)
        cuda = os.environ.get("MULLAMA_CUDA") == "1" or "GGML_CUDA=ON" in os.environ.get("CMAKE_ARGS", "")
        for ext in self.extensions:
            # src/: llama-grammar.h (_sampling.h runs llama.cpp's GBNF parser to name a grammar's error);
            # common/: llama.cpp's common library (JSON schema to grammar, chat templates with tools)
            ext.include_dirs += [str(src / "include"), str(src / "ggml" / "include"), str(src / "src"),
                                 str(src / "common")]
            ext.extra_objects += libs
            ext.extra_link_args += ["-lpthread", "-ldl"]
            if cuda:
                ext.extra_link_args += ["-lcudart", "-lcublas", "-lcuda"]
        from Cython.Build import cythonize

        # cythonize only here, at build time (metadata steps need no Cython);
        # keep setuptools' Extension objects and point them at the generated C++
        cythonize(self.extensions, compiler_directives={"language_level": "3"},
                  annotate=os.environ.get("MULLAMA_ANNOTATE") == "1")
        for ext in self.extensions:
            ext.sources = [s[:-4] + ".cpp" if s.endswith(".pyx") else s for s in ext.sources]
        super().run()


core = Extension(
    "mullama._core",
    ["mullama/_core.pyx"],
    depends=["mullama/_threads.h", "mullama/_sampling.h", "mullama/_speculative.h", "mullama/_common.h"],
    include_dirs=["mullama"],
    language="c++",
    extra_compile_args=["-std=c++17", "-O2"],
)

setup(ext_modules=[core], cmdclass={"build_ext": BuildExt})
