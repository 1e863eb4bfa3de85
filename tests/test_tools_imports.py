"""tools/'s import graph, read from the source (ast, nothing imported): dependencies point one way.

The command-line tools import the private modules and benchlib/; a harness never imports its callers.
Imports inside functions count: a lazy import is still a dependency (and a circle through one works only
until someone moves it to the top of the file).
"""
import ast
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / 'tools'


def module_name(path, root=TOOLS):
    """'benchmark', 'benchlib.cards', 'benchlib' (a package's __init__): as tools/ on sys.path names it."""
    parts = list(path.relative_to(root).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_names(tree, module, is_package):
    """Every absolute module name ``tree`` imports (relative imports resolved against ``module``); for
    ``from X import a`` both ``X`` and ``X.a`` (``a`` may be a submodule)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split('.') if is_package else module.split('.')[:-1]
                base = '.'.join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f'{base}.{alias.name}' for alias in node.names)
    return names


def import_graph(root=TOOLS):
    """{module: set of the modules of ``root`` it imports}."""
    files = {module_name(path, root): path for path in sorted(root.rglob('*.py'))}
    graph = {}
    for module, path in files.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == '__init__.py')
        graph[module] = {name for name in names if name in files and name != module}
    return graph


def find_cycle(graph):
    """One import circle of ``graph`` as [a, b, ..., a], or None."""
    state = {}   # module -> 'open' while on the current path, 'done' once all it reaches is explored

    def visit(path):
        module = path[-1]
        state[module] = 'open'
        for target in sorted(graph[module]):
            if state.get(target) == 'open':
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(path + [target])
                if cycle:
                    return cycle
        state[module] = 'done'
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit([module])
            if cycle:
                return cycle
    return None


def test_tools_import_graph_has_no_circle():
    graph = import_graph()
    assert {'benchmark', 'benchlib.cards', 'benchlib.cpu', 'benchlib.transnext'} <= set(graph)
    assert 'benchlib.harness' in graph['benchlib.cards'] and 'benchlib.transnext' in graph['benchlib.cpu']
    cycle = find_cycle(graph)
    assert cycle is None, 'import circle in tools/: ' + ' -> '.join(cycle)


def test_the_cycle_finder_sees_a_circle(tmp_path):
    """A lazy import inside a function that closes a circle, and a relative one, as the two circles fixed
    here were."""
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / '__init__.py').write_text('')
    (tmp_path / 'tool.py').write_text('from pkg.lib import helper\n')
    (tmp_path / 'pkg' / 'lib.py').write_text('from . import other\n\ndef helper():\n    from tool import main\n')
    (tmp_path / 'pkg' / 'other.py').write_text('import os\n')
    graph = import_graph(tmp_path)
    assert graph == {'tool': {'pkg.lib'}, 'pkg': set(), 'pkg.lib': {'pkg', 'pkg.other', 'tool'},
                     'pkg.other': set()}
    assert find_cycle(graph) == ['pkg.lib', 'tool', 'pkg.lib']
    (tmp_path / 'pkg' / 'lib.py').write_text('from . import other\n')
    assert find_cycle(import_graph(tmp_path)) is None
