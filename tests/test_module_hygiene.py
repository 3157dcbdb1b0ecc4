"""No module of ssd_jax imports a private name of another, and the modules
import each other without a cycle."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'ssd_jax')


def _modules():
  """{dotted module name: parsed tree} of every module of ssd_jax."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        dotted = dotted.removesuffix('.__init__')
        with open(path) as f:
          found[dotted] = ast.parse(f.read())
  return found


def _imports(tree, modules):
  """[(imported module, name or None, alias)] of the ssd_jax imports."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith('ssd_jax')):
      for alias in node.names:
        target = f'{node.module}.{alias.name}'
        if target in modules:  # `from ssd_jax.data import records`
          out.append((target, None, alias.asname or alias.name))
        else:  # `from ssd_jax.x import name`
          out.append((node.module, alias.name, alias.asname or alias.name))
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('ssd_jax'):
          out.append((alias.name, None, alias.asname or alias.name))
  return out


def test_no_private_name_of_another_module():
  modules = _modules()
  offences = []
  for name, tree in modules.items():
    imports = _imports(tree, modules)
    aliases = {alias for _, attr, alias in imports if attr is None}
    for target, attr, _ in imports:
      if attr and attr.startswith('_'):
        offences.append(f'{name}: from {target} import {attr}')
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
          and not node.attr.startswith('__')
          and isinstance(node.value, ast.Name) and node.value.id in aliases):
        offences.append(f'{name}: {node.value.id}.{node.attr}')
  assert not offences, offences


def test_no_import_cycle():
  modules = _modules()
  graph = {name: {target for target, _, _ in _imports(tree, modules)
                  if target in modules and target != name}
           for name, tree in modules.items()}
  # A package's own __init__ (ssd_jax, ssd_jax.data) may be imported by its
  # modules; it imports none of them at import time, so it is no cycle.
  for package in ('ssd_jax',):
    graph[package] = set()
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for target in sorted(graph[node]):
      if state.get(target) == 'open':
        raise AssertionError(' -> '.join(path + [target]))
      if target not in state:
        visit(target, path + [target])
    state[node] = 'done'

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
