"""compress.launch: the one way the study and the gate run a recipe in a child process."""
import sys

from compress.launch import launch, launch_command


def test_a_refused_recipe_gives_its_one_line_error_and_no_record(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('name: refused\nmodel: {name: test_spartan}\nstages: [{kind: ptq_int8, calib_images: -1}]\n')
    launched = launch(str(recipe), ['data.source=synthetic'], tmp_path / 'logs' / 'r.log')
    assert launched.code == 2 and launched.record is None
    assert launched.error.startswith('error: ') and 'calib_images' in launched.error, launched.error
    assert launched.log.read_text().startswith(f'$ {sys.executable} ')


def test_accelerate_options_go_before_the_script():
    command = launch_command('r.yaml', ['seed=1'], ['--num_processes', '2'])
    assert command[1:5] == ['-m', 'accelerate.commands.launch', '--num_processes', '2']
    assert command[-3].endswith('run.py') and command[-2:] == ['r.yaml', 'seed=1']
    assert launch_command('r.yaml', [])[1].endswith('run.py')
