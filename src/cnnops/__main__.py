from cnnops.cli import app

app(prog_name="cnnops")
